package controlplane

import (
	"errors"
	"math"
	"slices"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/waitstate/waitstate-go/internal/wire"
)

// decodePulse parses a pulse body into p. It is the control plane's hot
// path: a purpose-built reader of the pulse's fields, several times faster
// than encoding/json, which spends most of a pulse's time on reflection
// and maps. It accepts what encoding/json accepts for wire.PulseBody, and
// reads it the same way (a repeated member or map key: the later wins),
// with three differences, all stricter: member names match exactly (not
// case-insensitively), strings must be valid UTF-8, and the body must be
// an object (not null). Unknown members are skipped. FuzzDecodePulse holds
// it to encoding/json.
//
// With lean set, the histograms of tags not in watched are checked and
// skipped rather than kept: the rules read histograms of the site and of
// the tags they watch only.
func decodePulse(data []byte, p *wire.PulseBody, lean bool, watched []string) error {
	d := decoder{b: data, lean: lean, watched: watched}
	d.ws()
	d.pulse(p)
	d.ws()
	if d.err == nil && d.i != len(d.b) {
		d.fail("data after the pulse")
	}
	return d.err
}

var errSyntax = errors.New("pulse: invalid JSON")

type decoder struct {
	b       []byte
	i       int
	depth   int
	err     error
	lean    bool
	watched []string
}

func (d *decoder) fail(string) {
	if d.err == nil {
		d.err = errSyntax
	}
	d.i = len(d.b)
}

func (d *decoder) ws() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// peek returns the next byte after whitespace, 0 at the end.
func (d *decoder) peek() byte {
	d.ws()
	if d.i < len(d.b) {
		return d.b[d.i]
	}
	return 0
}

func (d *decoder) expect(c byte) {
	if d.peek() != c {
		d.fail("expected " + string(c))
		return
	}
	d.i++
}

func (d *decoder) literal(word string) {
	if len(d.b)-d.i < len(word) || string(d.b[d.i:d.i+len(word)]) != word {
		d.fail("bad literal")
		return
	}
	d.i += len(word)
}

// null consumes a null if one is next.
func (d *decoder) null() bool {
	if d.peek() == 'n' {
		d.literal("null")
		return true
	}
	return false
}

// object calls member for each member of an object, with the name's bytes
// (valid only during the call). A member named twice is read twice, the
// later overriding, as encoding/json does.
func (d *decoder) object(member func(name []byte)) {
	if !d.nest() {
		return
	}
	defer func() { d.depth-- }()
	d.expect('{')
	if d.peek() == '}' {
		d.i++
		return
	}
	for d.err == nil {
		name := d.str()
		d.expect(':')
		member(name)
		switch d.peek() {
		case ',':
			d.i++
		case '}':
			d.i++
			return
		default:
			d.fail("expected , or }")
		}
	}
}

// str reads a string and returns its bytes, unescaped.
func (d *decoder) str() []byte {
	if d.peek() != '"' {
		d.fail("expected a string")
		return nil
	}
	start := d.i + 1
	for j := start; j < len(d.b); j++ {
		switch c := d.b[j]; {
		case c == '"':
			d.i = j + 1
			s := d.b[start:j]
			if !utf8.Valid(s) {
				d.fail("invalid UTF-8")
			}
			return s
		case c == '\\':
			return d.escaped(start)
		case c < 0x20:
			d.fail("control character in string")
			return nil
		}
	}
	d.fail("unterminated string")
	return nil
}

// escaped reads a string with escapes, from its first byte at start. An
// escaped lone surrogate becomes U+FFFD, as encoding/json makes it.
func (d *decoder) escaped(start int) []byte {
	out := make([]byte, 0, 32)
	j := start
	for j < len(d.b) {
		c := d.b[j]
		switch {
		case c == '"':
			if !utf8.Valid(out) {
				d.fail("invalid UTF-8")
				return nil
			}
			d.i = j + 1
			return out
		case c < 0x20:
			d.fail("control character in string")
			return nil
		case c != '\\':
			out = append(out, c)
			j++
			continue
		}
		if j+1 >= len(d.b) {
			break
		}
		switch e := d.b[j+1]; e {
		case '"', '\\', '/':
			out = append(out, e)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r, ok := d.hex4(j + 2)
			if !ok {
				d.fail("bad \\u escape")
				return nil
			}
			j += 6
			if utf16.IsSurrogate(r) {
				if r2, ok := d.hex4(j + 2); ok && j+1 < len(d.b) && d.b[j] == '\\' && d.b[j+1] == 'u' {
					if pair := utf16.DecodeRune(r, r2); pair != utf8.RuneError {
						out = utf8.AppendRune(out, pair)
						j += 6
						continue
					}
				}
				r = utf8.RuneError
			}
			out = utf8.AppendRune(out, r)
			continue
		default:
			d.fail("bad escape")
			return nil
		}
		j += 2
	}
	d.fail("unterminated string")
	return nil
}

// hex4 reads the four hex digits of a \u escape at i.
func (d *decoder) hex4(i int) (rune, bool) {
	if i+4 > len(d.b) {
		return 0, false
	}
	var r rune
	for _, c := range d.b[i : i+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

// numberBytes reads a JSON number's bytes.
func (d *decoder) numberBytes() []byte {
	d.ws()
	start := d.i
	if d.i < len(d.b) && d.b[d.i] == '-' {
		d.i++
	}
	digits := func() int {
		n := 0
		for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
			d.i, n = d.i+1, n+1
		}
		return n
	}
	intStart := d.i
	if n := digits(); n == 0 || (n > 1 && d.b[intStart] == '0') {
		d.fail("bad number")
		return nil
	}
	if d.i < len(d.b) && d.b[d.i] == '.' {
		d.i++
		if digits() == 0 {
			d.fail("bad number")
			return nil
		}
	}
	if d.i < len(d.b) && (d.b[d.i] == 'e' || d.b[d.i] == 'E') {
		d.i++
		if d.i < len(d.b) && (d.b[d.i] == '+' || d.b[d.i] == '-') {
			d.i++
		}
		if digits() == 0 {
			d.fail("bad number")
			return nil
		}
	}
	return d.b[start:d.i]
}

// uint reads an unsigned integer; null leaves it as it was.
func (d *decoder) uint(v *uint64) {
	if d.null() {
		return
	}
	b := d.numberBytes()
	if d.err != nil {
		return
	}
	n, err := strconv.ParseUint(string(b), 10, 64)
	if err != nil {
		d.fail("not an unsigned integer")
		return
	}
	*v = n
}

// int reads an integer; null leaves it as it was.
func (d *decoder) int(v *int64) {
	if d.null() {
		return
	}
	b := d.numberBytes()
	if d.err != nil {
		return
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		d.fail("not an integer")
		return
	}
	*v = n
}

// float reads a number; null leaves it as it was.
func (d *decoder) float(v *float64) {
	if d.null() {
		return
	}
	b := d.numberBytes()
	if d.err != nil {
		return
	}
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil || math.IsInf(f, 0) {
		d.fail("not a number")
		return
	}
	*v = f
}

// bool reads a boolean; null leaves it as it was.
func (d *decoder) bool(v *bool) {
	switch d.peek() {
	case 'n':
		d.literal("null")
	case 't':
		d.literal("true")
		*v = true
	case 'f':
		d.literal("false")
		*v = false
	default:
		d.fail("expected a boolean")
	}
}

// string reads a string; null leaves it as it was.
func (d *decoder) string(v *string) {
	if d.null() {
		return
	}
	*v = string(d.str())
}

// array calls elem for each element of an array, as object does for an
// object's members.
func (d *decoder) array(elem func()) {
	if !d.nest() {
		return
	}
	defer func() { d.depth-- }()
	d.expect('[')
	if d.peek() == ']' {
		d.i++
		return
	}
	for d.err == nil {
		elem()
		switch d.peek() {
		case ',':
			d.i++
		case ']':
			d.i++
			return
		default:
			d.fail("expected , or ]")
		}
	}
}

// strings reads an array of strings as encoding/json does: null is nil,
// [] an empty slice; the array is read into *v's own backing array, whose
// element a null leaves as it was.
func (d *decoder) strings(v *[]string) {
	if d.null() {
		*v = nil
		return
	}
	if d.peek() != '[' {
		d.fail("expected an array")
		return
	}
	out := (*v)[:0]
	if out == nil {
		out = []string{}
	}
	d.array(func() {
		if len(out) < cap(out) {
			out = out[:len(out)+1]
		} else {
			out = append(out, "")
		}
		d.string(&out[len(out)-1])
	})
	if d.err == nil {
		*v = out
	}
}

// maxDepth bounds the nesting of objects and arrays, the pulse's own
// included, as encoding/json does.
const maxDepth = 10_000

// nest enters one more object or array, and fails past maxDepth; the
// caller leaves it with d.depth--.
func (d *decoder) nest() bool {
	d.depth++
	if d.depth > maxDepth {
		d.depth--
		d.fail("nested too deep")
		return false
	}
	return true
}

// skip reads any value.
func (d *decoder) skip() {
	switch d.peek() {
	case '{':
		d.object(func([]byte) { d.skip() })
	case '[':
		d.array(d.skip)
	case '"':
		d.str()
	case 't':
		d.literal("true")
	case 'f':
		d.literal("false")
	case 'n':
		d.literal("null")
	default:
		d.numberBytes()
	}
}

func (d *decoder) pulse(p *wire.PulseBody) {
	if d.peek() != '{' {
		d.fail("a pulse is an object")
		return
	}
	d.object(func(name []byte) {
		switch string(name) {
		case "instanceId":
			d.string(&p.InstanceID)
		case "incarnation":
			d.string(&p.Incarnation)
		case "siteId":
			d.string(&p.SiteID)
		case "sdk":
			d.string(&p.SDK)
		case "seq":
			d.uint(&p.Seq)
		case "windowEndMs":
			d.int(&p.WindowEndMs)
		case "windowMs":
			d.int(&p.WindowMs)
		case "ownPulseIntervalMs":
			d.int(&p.OwnIntervalMs)
		case "mode":
			d.string(&p.Mode)
		case "policyVersion":
			d.int(&p.PolicyVersion)
		case "shadow":
			d.bool(&p.Shadow)
		case "localRules":
			d.strings(&p.LocalRules)
		case "restored":
			d.bool(&p.Restored)
		case "usageDelta":
			d.uint(&p.UsageDelta)
		case "bouncedDelta":
			d.uint(&p.BouncedDelta)
		case "usageTotal":
			d.uint(&p.UsageTotal)
		case "bouncedTotal":
			d.uint(&p.BouncedTotal)
		case "tags":
			if d.null() {
				p.Tags = nil
				return
			}
			if p.Tags == nil {
				p.Tags = map[string]wire.TagCount{}
			}
			m := p.Tags
			d.object(func(tag []byte) {
				var tc wire.TagCount
				d.tagCount(&tc, !d.lean || slices.Contains(d.watched, string(tag)))
				m[string(tag)] = tc
			})
		case "health":
			d.health(&p.Health, true)
		case "metrics":
			d.metrics(&p.Metrics)
		case "trimmed":
			d.trimmed(&p.Trimmed)
		default:
			d.skip()
		}
	})
}

// trimmed reads what a pulse shed to fit, as encoding/json reads a pointer
// to a struct.
func (d *decoder) trimmed(tp **wire.Trimmed) {
	if d.null() {
		*tp = nil
		return
	}
	if *tp == nil {
		*tp = new(wire.Trimmed)
	}
	t := *tp
	d.object(func(name []byte) {
		switch string(name) {
		case "histograms":
			d.uint(&t.Histograms)
		case "metrics":
			d.uint(&t.Metrics)
		case "tags":
			d.uint(&t.Tags)
		default:
			d.skip()
		}
	})
}

func (d *decoder) tagCount(tc *wire.TagCount, histogram bool) {
	if d.null() {
		return
	}
	d.object(func(name []byte) {
		switch string(name) {
		case "usage":
			d.uint(&tc.Usage)
		case "bounced":
			d.uint(&tc.Bounced)
		case "health":
			d.health(&tc.Health, histogram)
		case "metrics":
			d.metrics(&tc.Metrics)
		default:
			d.skip()
		}
	})
}

func (d *decoder) health(hp **wire.Health, histogram bool) {
	if d.null() {
		*hp = nil
		return
	}
	if *hp == nil {
		*hp = new(wire.Health)
	}
	h := *hp
	d.object(func(name []byte) {
		switch string(name) {
		case "requests":
			d.uint(&h.Requests)
		case "errors":
			d.uint(&h.Errors)
		case "latencyMs":
			if d.null() {
				return
			}
			d.object(func(name []byte) {
				switch string(name) {
				case "p50":
					d.float(&h.LatencyMs.P50)
				case "p95":
					d.float(&h.LatencyMs.P95)
				case "p99":
					d.float(&h.LatencyMs.P99)
				case "max":
					d.float(&h.LatencyMs.Max)
				default:
					d.skip()
				}
			})
		case "histogram":
			if d.null() {
				h.Histogram = nil
				return
			}
			if !histogram {
				d.histogram(nil) // checked, not kept
				return
			}
			if h.Histogram == nil {
				h.Histogram = new(wire.Histogram)
			}
			d.histogram(h.Histogram)
		default:
			d.skip()
		}
	})
}

// histogram reads a histogram into hist, or only checks it when hist is
// nil.
func (d *decoder) histogram(hist *wire.Histogram) {
	var scheme string
	if hist != nil {
		scheme = hist.Scheme
	}
	d.object(func(name []byte) {
		switch string(name) {
		case "scheme":
			d.string(&scheme)
		case "counts":
			if d.null() {
				if hist != nil {
					hist.Counts = nil
				}
				return
			}
			if hist == nil {
				d.object(func([]byte) {
					var v uint64
					d.uint(&v)
				})
				return
			}
			if hist.Counts == nil {
				hist.Counts = map[string]uint64{}
			}
			m := hist.Counts
			d.object(func(key []byte) {
				var v uint64
				d.uint(&v)
				m[bucketKey(key)] = v
			})
		default:
			d.skip()
		}
	})
	if hist != nil && d.err == nil {
		hist.Scheme = scheme
	}
}

func (d *decoder) metrics(mp *map[string]wire.Metric) {
	if d.null() {
		*mp = nil
		return
	}
	if *mp == nil {
		*mp = map[string]wire.Metric{}
	}
	m := *mp
	d.object(func(key []byte) {
		name := string(key)
		var v wire.Metric
		if d.null() {
			m[name] = v
			return
		}
		d.object(func(field []byte) {
			switch string(field) {
			case "count":
				d.uint(&v.Count)
			case "sum":
				d.float(&v.Sum)
			case "min":
				d.float(&v.Min)
			case "max":
				d.float(&v.Max)
			default:
				d.skip()
			}
		})
		m[name] = v
	})
}

// bucketKeys are the histogram's bucket keys, "0" to "495", so that
// decoding a histogram allocates no key the scheme defines.
var bucketKeys = func() (keys [wire.HistBuckets]string) {
	for i := range keys {
		keys[i] = wire.BucketKey(i)
	}
	return keys
}()

// bucketKey returns key as a string, the shared one when it is a bucket
// key of the scheme.
func bucketKey(key []byte) string {
	if n := len(key); n > 0 && n <= 3 {
		i := 0
		for _, c := range key {
			if c < '0' || c > '9' {
				return string(key)
			}
			i = i*10 + int(c-'0')
		}
		if i < len(bucketKeys) && bucketKeys[i] == string(key) {
			return bucketKeys[i]
		}
	}
	return string(key)
}
