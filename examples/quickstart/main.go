// Command quickstart shows the WaitState loop end to end on one machine.
//
//	go run ./examples/quickstart
//
// With no environment it starts a control plane in-process on loopback
// (package waitstatetest) with one reflex rule — "fleet p95 latency above
// 200 ms: shed tag free" — and drives simulated traffic on the tags free,
// pro and enterprise (weights 1, 5 and 10) against a simulated backend whose
// latency climbs with load. It prints a table once a second and a line at
// each transition: the traffic spike, free shed while pro and enterprise
// pass, latency recovering, the rule clearing, then a control-plane outage,
// the lease expiring into safe mode, and recovery. It exits by itself after
// about 35 seconds, with a summary, and with status 1 if the story did not
// happen as told.
//
// With WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY set (and optionally
// WAITSTATE_BASE_URL and WAITSTATE_SITE_ID) it runs the same traffic against
// that control plane instead, without the outage, which it cannot cause.
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
	{"steady", 6 * time.Second, 1, false},
	{"spike", 8 * time.Second, 4, false},
	{"steady", 7 * time.Second, 1, false},
	{"outage", 7 * time.Second, 1, true},
	{"recovery", 5 * time.Second, 1, false},
}

// The simulated backend: requests cost the same; latency follows the
// utilisation of its capacity like a queue, base / (1 - ρ), with noise.
const (
	capacity    = 300.0 // requests per second
	baseLatency = 30 * time.Millisecond
	tick        = 20 * time.Millisecond
)

// The rule the embedded control plane runs.
var rule = waitstatetest.Rule{
	Name:            "p95-over-200ms-sheds-free",
	TagName:         "free",
	Metric:          waitstatetest.MetricLatencyP95,
	Operator:        "gt",
	Threshold:       200,
	MaxWeight:       0,
	CooldownSeconds: 8,
}

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
	client, err := waitstate.New(opts)
	if err != nil {
		return err
	}
	defer client.Close()

	readyCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := client.Ready(readyCtx); err != nil {
		fmt.Println("no policy yet, so Gate fails open:", err)
	}

	safeRPS := opts.SafeModeMaxRPS
	if safeRPS == 0 {
		safeRPS = waitstate.DefaultSafeModeMaxRPS
	}
	sim := newSimulation(client, srv, safeRPS)
	if err := sim.run(ctx); err != nil {
		return err
	}
	if err := client.Close(); err != nil {
		fmt.Println("final pulse:", err)
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
		opts.PulseInterval = 2 * time.Second
		opts.SyncInterval = 5 * time.Second
		script = slices.DeleteFunc(slices.Clone(script), func(p phase) bool { return p.outage })
		fmt.Printf("control plane %s (from the environment)\n", opts.BaseURL)
		return opts, nil, nil
	}
	srv := waitstatetest.NewServer()
	srv.SetPolicy("", &waitstate.Policy{Version: 1, GlobalMaxWeight: math.Inf(1)})
	if err := srv.SetRules("", rule); err != nil {
		srv.Close()
		return waitstate.Options{}, nil, err
	}
	srv.SetRuleWindow(1500 * time.Millisecond)
	srv.SetLeaseTTL(2 * time.Second)
	opts := srv.Options()
	opts.PulseInterval = 500 * time.Millisecond
	opts.SyncInterval = time.Second
	opts.SafeModeMaxRPS = 60
	fmt.Printf("embedded control plane on %s, rule %q: fleet p95 > %v ms → free max weight %v\n",
		srv.URL, rule.Name, rule.Threshold, rule.MaxWeight)
	return opts, srv, nil
}

// counts are one tag's decisions in one second.
type counts struct{ allowed, denied int }

type simulation struct {
	client  *waitstate.Client
	srv     *waitstatetest.Server // nil against a remote control plane
	safeRPS uint64
	start   time.Time

	admitted  []int // admissions per tick, last 250 ms: the backend's load
	second    map[string]*counts
	latencies []float64 // ms, this second

	mode       waitstate.Mode
	version    int64
	freeShed   bool
	events     int
	milestones []string
}

func newSimulation(c *waitstate.Client, srv *waitstatetest.Server, safeRPS uint64) *simulation {
	return &simulation{client: c, srv: srv, safeRPS: safeRPS, mode: c.Mode(), version: c.Policy().Version, second: newSecond()}
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
	fmt.Println("  time  phase     mode        policy  free ok/denied  pro ok/denied  enterprise ok/denied  p95")
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
			load := 0
			for _, tt := range due {
				if s.request(tt) {
					load++
				}
			}
			s.admitted = append(s.admitted, load)
			if len(s.admitted) > int(250*time.Millisecond/tick) {
				s.admitted = s.admitted[1:]
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

// request gates one request of tt and, when it is allowed, serves it on
// the simulated backend and records the health sample.
func (s *simulation) request(tt tagTraffic) bool {
	r := s.client.Gate(tt.name, tt.weight)
	c := s.second[tt.name]
	if !r.Allowed {
		c.denied++
		return false
	}
	c.allowed++
	latency := s.latency()
	s.client.Observe(latency, false)
	s.latencies = append(s.latencies, float64(latency)/float64(time.Millisecond))
	return true
}

// latency is the backend's answer time at its current load.
func (s *simulation) latency() time.Duration {
	sum := 0
	for _, n := range s.admitted {
		sum += n
	}
	rho := 0.0
	if len(s.admitted) > 0 {
		rho = float64(sum) / (float64(len(s.admitted)) * tick.Seconds()) / capacity
	}
	d := float64(baseLatency) / max(1-rho, 0.05)
	return time.Duration(d * (0.7 + 0.6*rand.Float64()))
}

// row prints the table's line for the second that just ended.
func (s *simulation) row(phase string) {
	p95 := "-"
	if n := len(s.latencies); n > 0 {
		slices.Sort(s.latencies)
		p95 = fmt.Sprintf("%.0f ms", s.latencies[int(math.Ceil(0.95*float64(n)))-1])
	}
	if s.srv != nil {
		if m := s.srv.Metrics(""); !math.IsNaN(m.LatencyP95Ms) {
			p95 += fmt.Sprintf(" (fleet %.0f ms)", m.LatencyP95Ms)
		}
	}
	c := func(tag string) string { return fmt.Sprintf("%d/%d", s.second[tag].allowed, s.second[tag].denied) }
	fmt.Printf("%5.0fs  %-8s  %-10s  v%-5d  %-14s  %-13s  %-20s  %s\n",
		time.Since(s.start).Seconds(), phase, s.client.Mode(), s.client.Policy().Version,
		c("free"), c("pro"), c("enterprise"), p95)
	s.second, s.latencies = newSecond(), s.latencies[:0]
}

// transitions prints a line at each change of mode, policy or free's fate,
// and at each rule event of the embedded control plane.
func (s *simulation) transitions() {
	if s.srv != nil {
		ev := s.srv.Events()
		for _, e := range ev[s.events:] {
			what := "cleared"
			if e.Fired {
				what = fmt.Sprintf("fired at fleet p95 %.0f ms", e.Value)
			}
			s.line("control plane: rule %q %s → policy v%d", e.Rule, what, e.Version)
		}
		s.events = len(ev)
	}
	// One reading of the client per tick: the lines below agree with each other.
	m, p := s.client.Mode(), s.client.Policy()
	if m != s.mode {
		switch m {
		case waitstate.ModeSafeMode:
			s.line("lease expired: SAFE MODE, at most %d admissions/s whatever the tag", s.safeRPS)
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
	if p.Version != s.version {
		s.version = p.Version
		s.line("client applied policy v%d: %s", p.Version, describe(p))
	}
	if m != waitstate.ModeEnforcing {
		return
	}
	free := p.Gate("free", 1).Allowed // the pure form: counts nothing
	switch {
	case !free && !s.freeShed:
		s.freeShed = true
		if p.Gate("pro", 5).Allowed && p.Gate("enterprise", 10).Allowed {
			s.line("free is SHED; pro and enterprise still pass")
			s.milestone("free shed while pro and enterprise pass")
		}
	case free && s.freeShed:
		s.freeShed = false
		s.line("free is RESTORED")
		s.milestone("free restored")
	}
}

func (s *simulation) line(format string, args ...any) {
	fmt.Printf("  → %5.1fs  %s\n", time.Since(s.start).Seconds(), fmt.Sprintf(format, args...))
}

func (s *simulation) milestone(m string) { s.milestones = append(s.milestones, m) }

// describe sums up a policy's limits.
func describe(p *waitstate.Policy) string {
	parts := []string{fmt.Sprintf("global max weight %v", p.GlobalMaxWeight)}
	for _, tag := range slices.Sorted(maps.Keys(p.TagMaxWeights)) {
		parts = append(parts, fmt.Sprintf("%s max weight %v", tag, p.TagMaxWeights[tag]))
	}
	return strings.Join(parts, ", ")
}

func (s *simulation) summary() {
	st := s.client.Stats()
	fmt.Println()
	fmt.Printf("In %.0f s the client gated %d requests (%d allowed, %d denied) from memory, "+
		"never waiting on the network; it sent %d pulses (%d attempts failed and were resent unchanged until "+
		"acknowledged) and ended on policy v%d in mode %s. ",
		time.Since(s.start).Seconds(), st.Usage+st.Bounced, st.Usage, st.Bounced,
		st.PulsesSent, st.PulsesFailed, st.PolicyVersion, st.Mode)
	if s.srv != nil {
		t := s.srv.Totals("")
		fmt.Printf("The control plane counted exactly the same: %d allowed, %d denied. ", t.Usage, t.Bounced)
		fmt.Printf("What happened: %s.\n", strings.Join(s.milestones, " → "))
	} else {
		fmt.Println()
	}
}

// check reports an error unless the embedded run told the whole story in
// order, and the control plane's counts match the client's.
func (s *simulation) check() error {
	want := []string{"free shed while pro and enterprise pass", "free restored", "safe mode", "enforcing again"}
	i := 0
	for _, m := range s.milestones {
		if i < len(want) && m == want[i] {
			i++
		}
	}
	if i < len(want) {
		return fmt.Errorf("the run did not show %q (it showed: %s)", want[i], strings.Join(s.milestones, ", "))
	}
	st, t := s.client.Stats(), s.srv.Totals("")
	if st.Usage != t.Usage || st.Bounced != t.Bounced {
		return fmt.Errorf("counts differ: client %d/%d, control plane %d/%d", st.Usage, st.Bounced, t.Usage, t.Bounced)
	}
	return nil
}
