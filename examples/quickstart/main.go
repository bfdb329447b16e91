// Command quickstart shows the WaitState loop end to end on one machine.
//
//	go run ./examples/quickstart
//
// With no environment it starts a control plane in-process on loopback
// (package waitstatetest) with two reflex rules on the enterprise tier's
// own latency — "enterprise p95 above 300 ms: block free" and "… throttle
// pro to 50 %" — and three instances of a service that share a backend.
// Traffic on the tags free, pro and enterprise passes Gate and is timed per
// tag; the backend slows down with load. It prints a table once a second
// and a line at each transition: a spike of free traffic slows the backend,
// the rules fire, free is blocked and pro throttled while enterprise keeps
// passing, the fleet pulses faster during the incident and slower after it,
// then a control-plane outage runs the lease out into safe mode, and
// recovery. It exits by itself in under a minute, with a summary, and with
// status 1 if the story did not happen as told or the control plane's
// counts differ from the clients'.
//
// With WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY set (and optionally
// WAITSTATE_BASE_URL and WAITSTATE_SITE_ID) it runs the same traffic against
// that control plane instead, without the rules and the outage, which it
// cannot set.
package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/waitstatetest"
)

// The traffic: three tags, each with its weight and request rate.
type tagTraffic struct {
	name   string
	weight float64
	rate   float64 // requests per second in the steady phases
}

var tags = []tagTraffic{
	{"free", 1, 120},
	{"pro", 5, 60},
	{"enterprise", 10, 20},
}

// The script. The spike multiplies free's rate; the outage takes the
// embedded control plane down.
type phase struct {
	name      string
	length    time.Duration
	freeScale float64
	outage    bool
}

var script = []phase{
	{"steady", 5 * time.Second, 1, false},
	{"spike", 10 * time.Second, 4, false},
	{"steady", 9 * time.Second, 1, false},
	{"outage", 7 * time.Second, 1, true},
	{"recovery", 5 * time.Second, 1, false},
}

// The simulated backend, shared by every tag and instance: latency follows
// its utilisation like a queue, base / (1 - ρ), with noise.
const (
	instances   = 3
	capacity    = 300.0 // requests per second
	baseLatency = 30 * time.Millisecond
	tick        = 20 * time.Millisecond
)

// The rules the embedded control plane runs: both measure enterprise's own
// latency (MetricTag), and act on other tiers.
var rules = []waitstatetest.Rule{
	{Name: "protect-enterprise-block-free", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "free", Action: waitstatetest.ActionBlock, CooldownSeconds: 10},
	{Name: "protect-enterprise-throttle-pro", MetricTag: "enterprise", Metric: waitstatetest.MetricLatencyP95,
		Operator: ">", Threshold: 300, TagName: "pro", Action: waitstatetest.ActionThrottle, Percent: 50, CooldownSeconds: 10},
}

// The SDK calls behind the table, printed at the end.
const calls = `The SDK calls behind this table, in each instance:

    client, err := waitstate.New(opts)            // once, at start-up
    if !client.Gate(tag, weight).Allowed {        // before each request: from memory, no network
        return 429
    }
    timer := client.StartTimer(tag)               // the tag's own health: what the rules read
    err := backend.Call(...)
    timer.Stop(err != nil)
    client.Close()                                // at shutdown: flushes the last counts`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	opts, srv, err := setup()
	if err != nil {
		return err
	}
	if srv != nil {
		defer srv.Close()
	}
	var fleet []*waitstate.Client
	defer func() {
		for _, c := range fleet {
			_ = c.Close()
		}
	}()
	for range instances {
		c, err := waitstate.New(opts)
		if err != nil {
			return err
		}
		fleet = append(fleet, c)
	}
	readyCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for _, c := range fleet {
		if err := c.Ready(readyCtx); err != nil {
			fmt.Println("no policy yet, so Gate fails open:", err)
			break
		}
	}

	sim := newSimulation(fleet, srv, opts)
	if err := sim.run(ctx); err != nil {
		return err
	}
	sim.work.Wait() // the requests in flight finish and are timed
	for _, c := range fleet {
		if err := c.Close(); err != nil {
			fmt.Println("final pulse:", err)
		}
	}
	sim.summary()
	if srv != nil {
		return sim.check()
	}
	return nil
}

// setup returns Options for a control plane: the one the environment
// names, or an embedded one (returned too) when it names none.
func setup() (waitstate.Options, *waitstatetest.Server, error) {
	if os.Getenv(waitstate.EnvPublishKey) != "" || os.Getenv(waitstate.EnvSecretKey) != "" {
		opts, err := waitstate.OptionsFromEnv()
		if err != nil {
			return opts, nil, err
		}
		script = slices.DeleteFunc(slices.Clone(script), func(p phase) bool { return p.outage })
		fmt.Printf("control plane %s (from the environment)\n", opts.BaseURL)
		return opts, nil, nil
	}
	srv := waitstatetest.NewServer()
	if err := srv.SetRules("", rules...); err != nil {
		srv.Close()
		return waitstate.Options{}, nil, err
	}
	srv.SetRuleWindow(time.Second)
	srv.SetLeaseTTL(2 * time.Second)
	// The control plane sets the cadence: every second, and every 250 ms
	// (its default, a quarter of that) while a rule is fired.
	srv.SetIntervals(time.Second, time.Second)
	opts := srv.Options()
	opts.SafeMode = waitstate.SafeModeFixedRPS
	opts.SafeModeMaxRPS = 20 // per instance
	fmt.Printf("embedded control plane on %s, %d instances told to pulse every 1s, and two rules:\n", srv.URL, instances)
	for _, r := range rules {
		what := "block"
		if r.Action == waitstatetest.ActionThrottle {
			what = fmt.Sprintf("throttle to %v %%", r.Percent)
		}
		fmt.Printf("  %s: %s p95 > %v ms → %s %s (cooldown %v s)\n", r.Name, r.MetricTag, r.Threshold, what, r.TagName, r.CooldownSeconds)
	}
	return opts, srv, nil
}

// counts are one tag's decisions in one second.
type counts struct{ allowed, denied int }

type simulation struct {
	fleet   []*waitstate.Client
	srv     *waitstatetest.Server // nil against a remote control plane
	opts    waitstate.Options
	start   time.Time
	next    int // the instance the next request goes to: round robin
	work    sync.WaitGroup
	mu      sync.Mutex
	entMs   []float64 // enterprise latencies this second, in ms
	second  map[string]*counts
	load    []int // admissions per tick, last 250 ms: the backend's load
	seenSeq uint64

	mode       waitstate.Mode
	version    int64
	pulse      time.Duration
	protected  bool // free blocked, pro throttled
	milestones []string
}

func newSimulation(fleet []*waitstate.Client, srv *waitstatetest.Server, opts waitstate.Options) *simulation {
	c := fleet[0]
	s := &simulation{fleet: fleet, srv: srv, opts: opts, mode: c.Mode(), pulse: c.Stats().PulseInterval, second: newSecond()}
	if p := c.Policy(); p != nil {
		s.version = p.Version
	}
	return s
}

func newSecond() map[string]*counts {
	m := map[string]*counts{}
	for _, t := range tags {
		m[t.name] = &counts{}
	}
	return m
}

func (s *simulation) run(ctx context.Context) error {
	s.start = time.Now()
	fmt.Println()
	fmt.Println("  time  phase     mode        policy  free ok/denied  pro ok/denied  enterprise ok/denied  enterprise p95         pulses every")
	t := time.NewTicker(tick)
	defer t.Stop()
	carry := map[string]float64{}
	nextPrint := s.start.Add(time.Second)
	for _, ph := range script {
		s.line("%s begins", ph.name)
		if s.srv != nil {
			if ph.outage {
				s.srv.SetFaults(waitstatetest.Faults{Down: true})
			} else {
				s.srv.Heal()
			}
		}
		end := time.Now().Add(ph.length)
		for time.Now().Before(end) {
			select {
			case <-ctx.Done():
				return errors.New("interrupted")
			case <-t.C:
			}
			// This tick's requests, in random order as they would arrive,
			// so that no tag is always served first.
			var due []tagTraffic
			for _, tt := range tags {
				rate := tt.rate
				if tt.name == "free" {
					rate *= ph.freeScale
				}
				carry[tt.name] += rate * tick.Seconds()
				for ; carry[tt.name] >= 1; carry[tt.name]-- {
					due = append(due, tt)
				}
			}
			rand.Shuffle(len(due), func(i, j int) { due[i], due[j] = due[j], due[i] })
			admitted := 0
			for _, tt := range due {
				if s.request(tt) {
					admitted++
				}
			}
			s.load = append(s.load, admitted)
			if len(s.load) > int(250*time.Millisecond/tick) {
				s.load = s.load[1:]
			}
			s.transitions()
			if now := time.Now(); now.After(nextPrint) {
				s.row(ph.name)
				nextPrint = nextPrint.Add(time.Second)
			}
		}
	}
	return nil
}

// request is one request, sent to the next instance: Gate, then the
// backend call, timed under its tag.
func (s *simulation) request(tt tagTraffic) bool {
	client := s.fleet[s.next]
	s.next = (s.next + 1) % len(s.fleet)
	s.mu.Lock()
	c := s.second[tt.name]
	s.mu.Unlock()
	if !client.Gate(tt.name, tt.weight).Allowed {
		c.denied++
		return false
	}
	c.allowed++
	latency := s.latency()
	s.work.Add(1)
	go func() {
		defer s.work.Done()
		timer := client.StartTimer(tt.name)
		time.Sleep(latency) // the backend call
		d := timer.Stop(false)
		if tt.name == "enterprise" {
			s.mu.Lock()
			s.entMs = append(s.entMs, float64(d)/float64(time.Millisecond))
			s.mu.Unlock()
		}
	}()
	return true
}

// latency is the backend's answer time at its current load.
func (s *simulation) latency() time.Duration {
	sum := 0
	for _, n := range s.load {
		sum += n
	}
	rho := 0.0
	if len(s.load) > 0 {
		rho = float64(sum) / (float64(len(s.load)) * tick.Seconds()) / capacity
	}
	d := float64(baseLatency) / max(1-rho, 0.05)
	return time.Duration(d * (0.7 + 0.6*rand.Float64()))
}

// row prints the table's line for the second that just ended.
func (s *simulation) row(phase string) {
	s.mu.Lock()
	lat := slices.Clone(s.entMs)
	s.entMs = s.entMs[:0]
	second := s.second
	s.second = newSecond()
	s.mu.Unlock()
	p95 := "-"
	if n := len(lat); n > 0 {
		slices.Sort(lat)
		p95 = fmt.Sprintf("%.0f ms", lat[int(math.Ceil(0.95*float64(n)))-1])
	}
	if s.srv != nil {
		if m := s.srv.TagMetrics("", "enterprise"); !math.IsNaN(m.LatencyP95Ms) {
			p95 += fmt.Sprintf(" (fleet %.0f)", m.LatencyP95Ms)
		}
	}
	c := func(tag string) string { return fmt.Sprintf("%d/%d", second[tag].allowed, second[tag].denied) }
	version := "-"
	if p := s.fleet[0].Policy(); p != nil {
		version = fmt.Sprintf("v%d", p.Version)
	}
	st := s.fleet[0].Stats()
	fmt.Printf("%5.0fs  %-8s  %-10s  %-6s  %-14s  %-13s  %-20s  %-21s  %v\n",
		time.Since(s.start).Seconds(), phase, st.Mode, version, c("free"), c("pro"), c("enterprise"), p95, st.PulseInterval)
}

// transitions prints a line at each change of mode, policy, cadence or the
// tiers' fate, and at each rule event of the embedded control plane.
func (s *simulation) transitions() {
	if s.srv != nil {
		for _, e := range s.srv.Events() {
			if e.Seq <= s.seenSeq {
				continue
			}
			s.seenSeq = e.Seq
			what := "cleared"
			if e.Fired {
				what = fmt.Sprintf("fired at enterprise p95 %.0f ms", e.Value)
			}
			s.line("control plane: rule %q %s → policy v%d", e.Rule, what, e.Version)
		}
	}
	// One reading of the first instance per tick: the lines below agree
	// with each other.
	c := s.fleet[0]
	m, p, pulse := c.Mode(), c.Policy(), c.Stats().PulseInterval
	if m != s.mode {
		switch m {
		case waitstate.ModeSafeMode:
			s.line("lease expired: SAFE MODE (%s), each instance admits at most %d calls/s whatever the tag", s.opts.SafeMode, s.opts.SafeModeMaxRPS)
			s.milestone("safe mode")
		case waitstate.ModeEnforcing:
			s.line("lease renewed: ENFORCING again")
			if s.mode == waitstate.ModeSafeMode {
				s.milestone("enforcing again")
			}
		default:
			s.line("mode %s", m)
		}
		s.mode = m
	}
	if pulse != s.pulse {
		if pulse < s.pulse {
			s.line("the control plane asks for pulses every %v: the fleet reports faster during the incident", pulse)
			s.milestone("pulses sped up")
		} else {
			s.line("the control plane asks for pulses every %v again", pulse)
			s.milestone("pulses slowed down")
		}
		s.pulse = pulse
	}
	if p == nil {
		return
	}
	if p.Version != s.version {
		s.version = p.Version
		s.line("instances apply policy v%d: %s", p.Version, describe(p))
	}
	if m != waitstate.ModeEnforcing {
		return
	}
	protected := p.TagShedPercents["free"] == 100 && p.TagShedPercents["pro"] == 50
	switch {
	case protected && !s.protected:
		s.protected = true
		if p.Gate("enterprise", 10).Allowed {
			s.line("free is BLOCKED and pro THROTTLED to 50 %%; enterprise still passes")
			s.milestone("free blocked, pro throttled, enterprise passes")
		}
	case !protected && s.protected:
		s.protected = false
		s.line("free and pro are RESTORED")
		s.milestone("free and pro restored")
	}
}

func (s *simulation) line(format string, args ...any) {
	fmt.Printf("  → %5.1fs  %s\n", time.Since(s.start).Seconds(), fmt.Sprintf(format, args...))
}

func (s *simulation) milestone(m string) { s.milestones = append(s.milestones, m) }

// describe sums up a policy's limits and shedding.
func describe(p *waitstate.Policy) string {
	parts := []string{fmt.Sprintf("global max weight %v", p.GlobalMaxWeight)}
	for _, tag := range slices.Sorted(maps.Keys(p.TagMaxWeights)) {
		parts = append(parts, fmt.Sprintf("%s max weight %v", tag, p.TagMaxWeights[tag]))
	}
	for _, tag := range slices.Sorted(maps.Keys(p.TagShedPercents)) {
		parts = append(parts, fmt.Sprintf("%s shed %v %%", tag, p.TagShedPercents[tag]))
	}
	return strings.Join(parts, ", ")
}

// totals adds up the fleet's own counts.
func (s *simulation) totals() (usage, bounced uint64, sent, failed uint64) {
	for _, c := range s.fleet {
		st := c.Stats()
		usage, bounced, sent, failed = usage+st.Usage, bounced+st.Bounced, sent+st.PulsesSent, failed+st.PulsesFailed
	}
	return
}

func (s *simulation) summary() {
	usage, bounced, sent, failed := s.totals()
	fmt.Println()
	fmt.Printf("In %.0f s, %d instances gated %d requests (%d allowed, %d denied) from memory, never waiting on the network; "+
		"they sent %d pulses (%d attempts failed and were resent unchanged until acknowledged). ",
		time.Since(s.start).Seconds(), len(s.fleet), usage+bounced, usage, bounced, sent, failed)
	if s.srv != nil {
		t := s.srv.Totals("")
		fmt.Printf("The control plane counted exactly the same: %d allowed, %d denied.\nWhat happened: %s.\n",
			t.Usage, t.Bounced, strings.Join(s.milestones, " → "))
	} else {
		fmt.Println()
	}
	fmt.Println()
	fmt.Println(calls)
}

// check reports an error unless the embedded run told the whole story in
// order, and the control plane's counts match the fleet's to the unit.
func (s *simulation) check() error {
	want := []string{"free blocked, pro throttled, enterprise passes", "pulses sped up", "free and pro restored", "pulses slowed down",
		"safe mode", "enforcing again"}
	for _, w := range want {
		if !slices.Contains(s.milestones, w) {
			return fmt.Errorf("the run did not show %q (it showed: %s)", w, strings.Join(s.milestones, ", "))
		}
	}
	order := func(a, b string) bool { return slices.Index(s.milestones, a) < slices.Index(s.milestones, b) }
	if !order("free blocked, pro throttled, enterprise passes", "free and pro restored") || !order("free and pro restored", "safe mode") ||
		!order("safe mode", "enforcing again") {
		return fmt.Errorf("the story ran out of order: %s", strings.Join(s.milestones, ", "))
	}
	usage, bounced, _, _ := s.totals()
	if t := s.srv.Totals(""); usage != t.Usage || bounced != t.Bounced {
		return fmt.Errorf("counts differ: instances %d/%d, control plane %d/%d", usage, bounced, t.Usage, t.Bounced)
	}
	return nil
}
