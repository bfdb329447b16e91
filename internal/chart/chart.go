// Package chart draws time series as one self-contained SVG: panels that
// share a time axis, each with its series and threshold lines, under bands
// that mark spans of time (a rule fired, safe mode). The control plane's
// page and the quickstart's picture both draw with it, so a chart looks the
// same in both.
package chart

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Point is one value at one time; a NaN value is a gap in its series.
type Point struct {
	T time.Time
	V float64
}

// Series is one named line of a panel.
type Series struct {
	Name   string
	Points []Point
	Dashed bool
	Color  string // "" picks one by the series' place in the panel
}

// Line is a horizontal line across a panel, such as a rule's threshold.
type Line struct {
	Label string
	V     float64
}

// Panel is one plot: its series against a value axis from 0.
type Panel struct {
	Title  string
	Series []Series
	Lines  []Line
}

// Band marks a span of time across every panel.
type Band struct {
	Label    string
	From, To time.Time
	Color    string // "" is grey
}

// Chart is the whole picture.
type Chart struct {
	Title    string
	From, To time.Time // the time axis; zero: the span of the points
	Panels   []Panel
	Bands    []Band
	Width    int  // pixels; 0 is 960
	Ago      bool // label the time axis back from To ("-30 s", "now"), not on from From
}

// Palette is the colours given to series without one, in order.
var Palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"}

// Layout, in pixels.
const (
	panelHeight = 180
	marginLeft  = 64
	marginRight = 150 // the legend
	titleHeight = 28
	bandRow     = 16 // a row of band labels
	panelGap    = 46
	maxBandRows = 6
)

// SVG draws the chart. The output is a standalone SVG document; every
// text in it is escaped. Each series is one <polyline> (one per unbroken
// run of points) with class "series" and its name in data-series.
func (c *Chart) SVG() []byte {
	width := c.Width
	if width <= 0 {
		width = 960
	}
	from, to := c.span()
	plotW := float64(width - marginLeft - marginRight)
	x := func(t time.Time) float64 {
		return marginLeft + plotW*float64(t.Sub(from))/float64(max(to.Sub(from), time.Nanosecond))
	}
	rowOf := c.bandRows()
	rows := 0
	for _, r := range rowOf {
		rows = max(rows, r+1)
	}
	top := titleHeight + bandRow*max(rows, 1)
	height := top + len(c.Panels)*(panelHeight+panelGap) + 8

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`+"\n",
		width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#fff"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="18" font-size="14" font-weight="bold">%s</text>`+"\n", marginLeft, esc(c.Title))

	// Bands behind everything, each label on its own row.
	bottom := height - 8
	for _, band := range c.Bands {
		color := band.Color
		if color == "" {
			color = "#999"
		}
		x0, x1 := x(maxTime(band.From, from)), x(minTime(band.To, to))
		if x1 < x0 {
			continue
		}
		row := rowOf[band.Label]
		fmt.Fprintf(&b, `<g class="band" data-band="%s"><rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" fill-opacity="0.13"/>`,
			esc(band.Label), x0, top, max(x1-x0, 1), bottom-top, esc(color))
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" fill-opacity="0.5"/>`,
			x0, titleHeight+row*bandRow, max(x1-x0, 1), bandRow-3, esc(color))
		fmt.Fprintf(&b, `<text x="%.1f" y="%d">%s</text></g>`+"\n", x0+2, titleHeight+row*bandRow+bandRow-6, esc(band.Label))
	}

	for pi, p := range c.Panels {
		y0 := top + pi*(panelHeight+panelGap) + 18 // the panel's top
		c.panel(&b, &p, x, from, to, y0, plotW)
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

// panel draws one panel whose plot area starts at y0.
func (c *Chart) panel(b *bytes.Buffer, p *Panel, x func(time.Time) float64, from, to time.Time, y0 int, plotW float64) {
	top := max(p.maxValue(), 1e-9)
	scale := niceCeil(top * 1.1)
	y := func(v float64) float64 { return float64(y0+panelHeight) - float64(panelHeight)*v/scale }
	fmt.Fprintf(b, `<g class="panel" data-panel="%s">`+"\n", esc(p.Title))
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="12" font-weight="bold">%s</text>`+"\n", marginLeft, y0-6, esc(p.Title))
	fmt.Fprintf(b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="none" stroke="#ccc"/>`+"\n", marginLeft, y0, plotW, panelHeight)
	for i := 0; i <= 4; i++ { // value ticks
		v := scale * float64(i) / 4
		fmt.Fprintf(b, `<line x1="%d" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#eee"/><text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n",
			marginLeft, marginLeft+plotW, y(v), y(v), marginLeft-4, y(v)+4, formatValue(v))
	}
	span := to.Sub(from)
	step := timeStep(span)
	for t := time.Duration(0); t <= span; t += step { // time ticks
		at, label := from.Add(t), formatOffset(t)
		if c.Ago {
			at, label = to.Add(-t), "-"+formatOffset(t)
			if t == 0 {
				label = "now"
			}
		}
		fmt.Fprintf(b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#666">%s</text>`+"\n", x(at), y0+panelHeight+14, label)
	}
	for _, l := range p.Lines {
		fmt.Fprintf(b, `<g class="threshold"><line x1="%d" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#000" stroke-dasharray="6 3"/>`+
			`<text x="%.1f" y="%.1f" text-anchor="end">%s</text></g>`+"\n",
			marginLeft, marginLeft+plotW, y(l.V), y(l.V), marginLeft+plotW-2, y(l.V)-3, esc(l.Label))
	}
	for i, s := range p.Series {
		color := s.Color
		if color == "" {
			color = Palette[i%len(Palette)]
		}
		dash := ""
		if s.Dashed {
			dash = ` stroke-dasharray="4 3"`
		}
		open := fmt.Sprintf(`<polyline class="series" data-series="%s" fill="none" stroke="%s" stroke-width="1.6"%s points="`,
			esc(s.Name), esc(color), dash)
		run := 0 // points in the polyline being written
		for _, pt := range s.Points {
			if math.IsNaN(pt.V) || math.IsInf(pt.V, 0) || pt.T.Before(from) || pt.T.After(to) {
				if run > 0 {
					b.WriteString("\"/>\n")
					run = 0
				}
				continue
			}
			if run == 0 {
				b.WriteString(open)
			} else {
				b.WriteByte(' ')
			}
			b.Write(strconv.AppendFloat(b.AvailableBuffer(), x(pt.T), 'f', 1, 64))
			b.WriteByte(',')
			b.Write(strconv.AppendFloat(b.AvailableBuffer(), y(pt.V), 'f', 1, 64))
			run++
		}
		if run > 0 {
			b.WriteString("\"/>\n")
		}
		ly := y0 + 10 + 15*i // the legend, right of the plot
		fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="%s" stroke-width="2"%s/><text x="%.1f" y="%d">%s</text>`+"\n",
			marginLeft+plotW+8, marginLeft+plotW+26, ly, ly, esc(color), dash, marginLeft+plotW+30, ly+4, esc(s.Name))
	}
	b.WriteString("</g>\n")
}

// span is the chart's time axis.
func (c *Chart) span() (from, to time.Time) {
	from, to = c.From, c.To
	if from.IsZero() || to.IsZero() {
		for _, p := range c.Panels {
			for _, s := range p.Series {
				for _, pt := range s.Points {
					if from.IsZero() || pt.T.Before(from) {
						from = pt.T
					}
					if to.IsZero() || pt.T.After(to) {
						to = pt.T
					}
				}
			}
		}
	}
	if !to.After(from) {
		to = from.Add(time.Second)
	}
	return from, to
}

// bandRows gives each band label a row of its own for its labels, in
// the order the labels first appear, up to maxBandRows (then they share).
func (c *Chart) bandRows() map[string]int {
	rows := map[string]int{}
	for _, b := range c.Bands {
		if _, ok := rows[b.Label]; !ok {
			rows[b.Label] = len(rows) % maxBandRows
		}
	}
	return rows
}

func (p *Panel) maxValue() float64 {
	top := 0.0
	for _, s := range p.Series {
		for _, pt := range s.Points {
			if !math.IsNaN(pt.V) && !math.IsInf(pt.V, 0) {
				top = max(top, pt.V)
			}
		}
	}
	for _, l := range p.Lines {
		top = max(top, l.V)
	}
	return top
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func timeStep(span time.Duration) time.Duration {
	for _, s := range []time.Duration{time.Second, 5 * time.Second, 10 * time.Second, 30 * time.Second, time.Minute, 5 * time.Minute} {
		if span/s <= 10 {
			return s
		}
	}
	return 10 * time.Minute
}

func formatOffset(d time.Duration) string {
	if d%time.Minute == 0 && d > 0 {
		return strconv.Itoa(int(d/time.Minute)) + " min"
	}
	return strconv.Itoa(int(d/time.Second)) + " s"
}

func formatValue(v float64) string {
	switch {
	case v >= 10000:
		return strconv.FormatFloat(v/1000, 'f', 0, 64) + "k"
	case v >= 10 || v == 0:
		return strconv.FormatFloat(v, 'f', 0, 64)
	default:
		return strconv.FormatFloat(v, 'g', 2, 64)
	}
}

// esc escapes s for XML text and attribute values.
func esc(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
