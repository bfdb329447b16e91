package wire

import (
	"encoding/json"
	"errors"
	"maps"
	"math"
	"slices"
	"strconv"
)

// Policy is the wire form of a policy, for encoding. Weights are JSON
// numbers, with +Inf as the string "Infinity"; shed percents are numbers in
// [0, 100]. The SDK parses policies itself, strictly.
type Policy struct {
	Version           int64
	GlobalMaxWeight   float64
	TagMaxWeights     map[string]float64
	GlobalShedPercent float64
	TagShedPercents   map[string]float64
}

// ErrUnencodable is returned for a weight that is NaN or negative, or a
// shed percent outside [0, 100]: no policy on the wire carries one.
var ErrUnencodable = errors.New("weight must be a number >= 0 and shed percent in [0, 100]")

// MarshalJSON encodes p with its tags in sorted order, so that equal
// policies encode to equal bytes. Shed fields appear only when set.
func (p Policy) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, 64+24*(len(p.TagMaxWeights)+len(p.TagShedPercents)))
	b = append(b, `{"version":`...)
	b = strconv.AppendInt(b, p.Version, 10)
	b = append(b, `,"globalMaxWeight":`...)
	var err error
	if b, err = appendWeight(b, p.GlobalMaxWeight); err != nil {
		return nil, err
	}
	b = append(b, `,"tagMaxWeights":`...)
	if b, err = appendMap(b, p.TagMaxWeights, appendWeight); err != nil {
		return nil, err
	}
	if p.GlobalShedPercent != 0 {
		b = append(b, `,"globalShedPercent":`...)
		if b, err = appendPercent(b, p.GlobalShedPercent); err != nil {
			return nil, err
		}
	}
	if len(p.TagShedPercents) != 0 {
		b = append(b, `,"tagShedPercents":`...)
		if b, err = appendMap(b, p.TagShedPercents, appendPercent); err != nil {
			return nil, err
		}
	}
	return append(b, '}'), nil
}

func appendMap(b []byte, m map[string]float64, value func([]byte, float64) ([]byte, error)) ([]byte, error) {
	b = append(b, '{')
	for i, tag := range slices.Sorted(maps.Keys(m)) {
		if i > 0 {
			b = append(b, ',')
		}
		k, _ := json.Marshal(tag) // a string always encodes
		b = append(b, k...)
		b = append(b, ':')
		var err error
		if b, err = value(b, m[tag]); err != nil {
			return nil, err
		}
	}
	return append(b, '}'), nil
}

func appendWeight(b []byte, w float64) ([]byte, error) {
	switch {
	case math.IsInf(w, 1):
		return append(b, `"Infinity"`...), nil
	case math.IsNaN(w) || w < 0:
		return nil, ErrUnencodable
	}
	return strconv.AppendFloat(b, w, 'g', -1, 64), nil
}

func appendPercent(b []byte, p float64) ([]byte, error) {
	if !(p >= 0 && p <= 100) {
		return nil, ErrUnencodable
	}
	return strconv.AppendFloat(b, p, 'g', -1, 64), nil
}
