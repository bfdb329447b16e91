// Command quickstart shows the WaitState loop end to end on one machine.
//
//	go run ./examples/quickstart            # the story, in under a minute
//	go run ./examples/quickstart -compare   # one outage under each safe-mode strategy, as a table
//	go run ./examples/quickstart -ui 127.0.0.1:8788   # and watch it on the control plane's live page
//	go run ./examples/quickstart -svg docs/quickstart.svg   # and draw the run (the README's picture)
//
// With no environment it starts a control plane in-process on loopback
// (package waitstatetest) with two reflex rules on the enterprise tier's
// own latency — "enterprise p95 above 300 ms: block free" and "… throttle
// pro to 50 %" — and three instances of a service that share a backend.
// Traffic on the tags free, pro and enterprise passes Gate and is timed per
// tag; the backend slows down with load. It prints a table once a second
// and a line at each transition: a spike of free traffic slows the backend,
// the rules fire, free is blocked and pro throttled while enterprise keeps
// passing, the fleet pulses faster during the incident and slower after it.
// Then free spikes again and the control plane goes down: the leases run
// out and each instance, in safe mode with SafeModeLocalRules, runs the
// rules itself — they stay fired as the control plane left them, clear
// after their cooldown, and fire again on the instance's own samples, so
// free is blocked with no control plane while enterprise keeps passing.
// Mid-outage one instance is restarted; it finds its last policy in its
// FileStore and enforces it from its first call. Then recovery. It exits
// by itself in under a minute, with a summary, and with status 1 if the
// story did not happen as told or the control plane's counts differ from
// the clients'.
//
// With -compare it runs one outage with a spike of free under each
// safe-mode strategy, each on a control plane of its own, and prints what
// each let through as a Markdown table (the README's).
//
// With -ui it serves the embedded control plane's live page on that address
// while the story runs; with -svg it writes one SVG of the run: each tag's
// calls admitted and denied a second, enterprise's p95 against the rules'
// threshold, and bands for the rules fired, the outage, safe mode, the
// rules fired locally and the restored instance.
//
// With WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY set (and optionally
// WAITSTATE_BASE_URL and WAITSTATE_SITE_ID) it runs the same traffic against
// that control plane instead, without the rules and the outage, which it
// cannot set.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
// embedded control plane down; restartAt restarts the last instance that
// far into the phase.
type phase struct {
	name      string
	length    time.Duration
	freeScale float64
	outage    bool
	restartAt time.Duration
	measured  bool // -compare reports on this phase
}

var script = []phase{
	{name: "steady", length: 5 * time.Second, freeScale: 1},
	{name: "spike", length: 10 * time.Second, freeScale: 4},
	{name: "steady", length: 9 * time.Second, freeScale: 1},
	{name: "spike", length: 3 * time.Second, freeScale: 4},
	{name: "outage", length: 16 * time.Second, freeScale: 4, outage: true, restartAt: 6 * time.Second},
	{name: "recovery", length: 5 * time.Second, freeScale: 1},
}

// compareScript is the outage -compare runs under each strategy: the
// control plane goes down while traffic is steady, and once every lease
// has run out free spikes.
var compareScript = []phase{
	{name: "steady", length: 4 * time.Second, freeScale: 1},
	{name: "outage", length: 3 * time.Second, freeScale: 1, outage: true},
	{name: "spike", length: 10 * time.Second, freeScale: 4, outage: true, measured: true},
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
		Operator: ">", Threshold: 300, TagName: "pro", Action: waitstatetest.ActionThrottle, AdmitPercent: 50, CooldownSeconds: 10},
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
	compareFlag := flag.Bool("compare", false, "run the outage with a spike of free once under each safe-mode strategy and print the table the README shows")
	uiAddr := flag.String("ui", "", "serve the embedded control plane's live page on this address while the story runs, such as 127.0.0.1:8788")
	svgPath := flag.String("svg", "", "write a picture of the run to this SVG file")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	run := func(ctx context.Context) error { return story(ctx, *uiAddr, *svgPath) }
	if *compareFlag {
		run = compare
	}
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

// story runs the script and tells it; it serves the live page on uiAddr
// and draws the run into svgPath when they are set.
func story(ctx context.Context, uiAddr, svgPath string) error {
	opts, srv, err := setup()
	if err != nil {
		return err
	}
	var dir string
	if srv != nil {
		defer srv.Close()
		if uiAddr != "" {
			stopUI, err := serveUI(srv, uiAddr)
			if err != nil {
				return err
			}
			defer stopUI()
		}
		// Each instance keeps its last verified policy in a file of its
		// own, as a process would on its disk.
		if dir, err = os.MkdirTemp("", "waitstate-quickstart-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	if uiAddr != "" && srv == nil {
		return errors.New("-ui serves the embedded control plane's page; for your own, run examples/controlplane -ui")
	}
	sim := newSimulation(srv, opts)
	defer sim.close()
	if svgPath != "" {
		sim.rec = newRecording()
	}
	for i := range instances {
		o := opts
		if srv != nil {
			o.InstanceID = fmt.Sprintf("instance-%d", i+1)
			o.PolicyStore = waitstate.FileStore(filepath.Join(dir, o.InstanceID+".snapshot"))
		}
		if err := sim.add(o); err != nil {
			return err
		}
	}
	sim.ready(ctx)
	if err := sim.run(ctx, script); err != nil {
		return err
	}
	sim.work.Wait() // the requests in flight finish and are timed
	for _, c := range sim.clients() {
		if err := c.Close(); err != nil {
			fmt.Println("final pulse:", err)
		}
	}
	sim.summary()
	if svgPath != "" {
		if err := sim.rec.write(svgPath, sim.start, time.Now()); err != nil {
			return err
		}
		fmt.Printf("\nThe picture of this run: %s\n", svgPath)
	}
	if srv != nil {
		return sim.check()
	}
	return nil
}

// serveUI serves srv's live page on addr until the returned function is
// called.
func serveUI(srv *waitstatetest.Server, addr string) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("-ui: %w", err)
	}
	page := &http.Server{Handler: srv.UI(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = page.Serve(ln) }()
	fmt.Printf("The control plane's live page: http://%s\n", ln.Addr())
	if ip := ln.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
		fmt.Fprintf(os.Stderr, "*** WARNING: the live page listens on %s, beyond loopback: anyone who can reach it sees the fleet's figures. ***\n", ln.Addr())
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = page.Shutdown(ctx)
	}, nil
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
	srv, opts, err := embedded(waitstate.SafeModeLocalRules)
	if err != nil {
		return opts, nil, err
	}
	fmt.Printf("embedded control plane on %s, %d instances told to pulse every 1s, and two rules:\n", srv.URL, instances)
	for _, r := range rules {
		what := "block"
		if r.Action == waitstatetest.ActionThrottle {
			what = fmt.Sprintf("throttle to %v %%", r.AdmitPercent)
		}
		fmt.Printf("  %s: %s p95 > %v ms → %s %s (cooldown %v s)\n", r.Name, r.MetricTag, r.Threshold, what, r.TagName, r.CooldownSeconds)
	}
	fmt.Printf("In an outage each instance runs these rules itself (SafeMode %s), and keeps its last policy in a FileStore.\n", opts.SafeMode)
	return opts, srv, nil
}

// embedded starts a control plane in-process with the rules, and returns
// it with Options for its clients in the given safe mode.
func embedded(strategy waitstate.SafeModeStrategy) (*waitstatetest.Server, waitstate.Options, error) {
	srv := waitstatetest.NewServer()
	if err := srv.SetRules("", rules...); err != nil {
		srv.Close()
		return nil, waitstate.Options{}, err
	}
	srv.SetRuleWindow(time.Second)
	srv.SetLeaseTTL(2 * time.Second)
	// The control plane sets the cadence: every second, and every 250 ms
	// (its default, a quarter of that) while a rule is fired.
	srv.SetIntervals(time.Second, time.Second)
	opts := srv.Options()
	opts.SafeMode = strategy
	opts.SafeModeMaxRPS = 20 // per instance, for SafeModeFixedRPS
	return srv, opts, nil
}

// counts are one tag's decisions.
type counts struct{ allowed, denied int }

// measure is what -compare reports of its measured phase.
type measure struct {
	counts map[string]*counts
	entMs  []float64 // enterprise latencies, in ms
}

type simulation struct {
	fleet   []*waitstate.Client // the instances, in the order requests go round
	opts    []waitstate.Options // each instance's
	retired []*waitstate.Client // instances restarted: see restart
	srv     *waitstatetest.Server
	base    waitstate.Options
	quiet   bool // -compare: no table, no lines
	start   time.Time
	next    int // the instance the next request goes to: round robin
	work    sync.WaitGroup
	mu      sync.Mutex
	entMs   []float64 // enterprise latencies this second, in ms
	second  map[string]*counts
	meas    *measure // set while a measured phase runs
	load    []int    // admissions per tick, last 250 ms: the backend's load
	seenSeq uint64

	mode       waitstate.Mode
	version    int64
	pulse      time.Duration
	protected  bool     // free blocked, pro throttled
	localFired []string // the rules the first instance fired itself
	restarted  *waitstate.Client
	restSafe   bool   // the restarted instance's lease has run out
	outageEnt  counts // enterprise's decisions during the outage
	milestones []string
	rec        *recording  // -svg: what the picture draws; nil without
	changed    atomic.Bool // a → line was printed during the second being counted
}

func newSimulation(srv *waitstatetest.Server, base waitstate.Options) *simulation {
	return &simulation{srv: srv, base: base, second: newSecond(), version: -1}
}

// add starts an instance with opts.
func (s *simulation) add(opts waitstate.Options) error {
	c, err := waitstate.New(opts)
	if err != nil {
		return err
	}
	s.fleet = append(s.fleet, c)
	s.opts = append(s.opts, opts)
	return nil
}

// ready waits, up to 10 s, for every instance's first policy.
func (s *simulation) ready(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for _, c := range s.fleet {
		if err := c.Ready(ctx); err != nil {
			fmt.Println("no policy yet, so Gate fails open:", err)
			break
		}
	}
	c := s.fleet[0]
	s.mode, s.pulse = c.Mode(), c.Stats().PulseInterval
}

// clients are every client started, restarted ones included.
func (s *simulation) clients() []*waitstate.Client {
	return append(slices.Clone(s.fleet), s.retired...)
}

func (s *simulation) close() {
	for _, c := range s.clients() {
		_ = c.Close()
	}
}

func newSecond() map[string]*counts {
	m := map[string]*counts{}
	for _, t := range tags {
		m[t.name] = &counts{}
	}
	return m
}

func (s *simulation) run(ctx context.Context, script []phase) error {
	s.start = time.Now()
	if !s.quiet {
		fmt.Println()
		fmt.Println("Each row counts one second, ending at its time, summed over the fleet's instances. A → line marks a change")
		fmt.Println("within the next row's second: that row, starred, mixes what came before and after. p95 is instance 1's,")
		fmt.Println("and in brackets the fleet's, as the control plane merged it. A weight limit of +Inf is no limit.")
		fmt.Println()
		fmt.Println("  time  phase     mode        policy    free ok/denied  pro ok/denied  enterprise ok/denied  enterprise p95         pulses every")
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	carry := map[string]float64{}
	nextPrint := s.start.Add(time.Second)
	for _, ph := range script {
		s.line("%s begins", ph.name)
		s.rec.mark(bandDown, ph.outage && s.srv != nil, time.Now())
		if s.srv != nil {
			if ph.outage {
				s.srv.SetFaults(waitstatetest.Faults{Down: true})
			} else {
				s.srv.Heal()
			}
		}
		s.mu.Lock()
		s.meas = nil
		if ph.measured {
			s.meas = &measure{counts: newSecond()}
		}
		s.mu.Unlock()
		begin := time.Now()
		end := begin.Add(ph.length)
		restarted := false
		for time.Now().Before(end) {
			select {
			case <-ctx.Done():
				return errors.New("interrupted")
			case <-t.C:
			}
			if ph.restartAt > 0 && !restarted && time.Since(begin) >= ph.restartAt {
				restarted = true
				if err := s.restart(); err != nil {
					return err
				}
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
				allowed := s.request(tt)
				if allowed {
					admitted++
				}
				if ph.outage && tt.name == "enterprise" {
					if allowed {
						s.outageEnt.allowed++
					} else {
						s.outageEnt.denied++
					}
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
		if ph.outage && !ph.measured && s.outageEnt.allowed > 0 && s.outageEnt.denied == 0 {
			s.line("the outage is over: enterprise passed all %d of its calls", s.outageEnt.allowed)
			s.milestone("enterprise passed throughout the outage")
		}
	}
	return nil
}

// restart restarts the last instance: a new process, with the same name
// and the same FileStore, takes its traffic. The old client takes no more
// calls; it is closed at the end, once the control plane is back, so that
// the counts it could not send during the outage reach it and the totals
// stay exact (a process killed in an outage loses its unsent counts).
func (s *simulation) restart() error {
	i := len(s.fleet) - 1
	c, err := waitstate.New(s.opts[i])
	if err != nil {
		return err
	}
	s.retired = append(s.retired, s.fleet[i])
	s.fleet[i], s.restarted = c, c
	st := c.Stats()
	s.rec.mark(bandRestored, st.Restored, time.Now())
	if !st.Restored || st.Mode != waitstate.ModeEnforcing {
		s.line("instance %d RESTARTED, but nothing was restored: %s (%s)", i+1, st.Mode, st.LastError)
		return nil
	}
	p := c.Policy()
	s.line("instance %d RESTARTED with the control plane still down: policy v%d RESTORED from its FileStore, enforcing from its first call: %s",
		i+1, p.Version, describe(p))
	s.milestone("restored")
	return nil
}

// request is one request, sent to the next instance: Gate, then the
// backend call, timed under its tag.
func (s *simulation) request(tt tagTraffic) bool {
	client := s.fleet[s.next]
	s.next = (s.next + 1) % len(s.fleet)
	allowed := client.Gate(tt.name, tt.weight).Allowed
	s.mu.Lock()
	c, m := s.second[tt.name], s.meas
	if allowed {
		c.allowed++
	} else {
		c.denied++
	}
	if m != nil {
		if allowed {
			m.counts[tt.name].allowed++
		} else {
			m.counts[tt.name].denied++
		}
	}
	s.mu.Unlock()
	if !allowed {
		return false
	}
	latency := s.latency()
	s.work.Add(1)
	go func() {
		defer s.work.Done()
		timer := client.StartTimer(tt.name)
		time.Sleep(latency) // the backend call
		d := timer.Stop(false)
		if tt.name == "enterprise" {
			ms := float64(d) / float64(time.Millisecond)
			s.mu.Lock()
			s.entMs = append(s.entMs, ms)
			if m != nil {
				m.entMs = append(m.entMs, ms)
			}
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

// quantile is the q-quantile of ms (nearest rank), sorted in place; NaN
// if empty.
func quantile(ms []float64, q float64) float64 {
	if len(ms) == 0 {
		return math.NaN()
	}
	slices.Sort(ms)
	return ms[max(int(math.Ceil(q*float64(len(ms))))-1, 0)]
}

// row prints the table's line for the second that just ended.
func (s *simulation) row(phase string) {
	s.mu.Lock()
	lat := slices.Clone(s.entMs)
	s.entMs = s.entMs[:0]
	second := s.second
	s.second = newSecond()
	s.mu.Unlock()
	s.rec.frame(time.Now(), second, quantile(lat, 0.95))
	if s.quiet {
		return
	}
	p := "-"
	if v := quantile(lat, 0.95); !math.IsNaN(v) {
		p = fmt.Sprintf("%.0f ms", v)
	}
	if s.srv != nil {
		if m := s.srv.TagMetrics("", "enterprise"); !math.IsNaN(m.LatencyP95Ms) {
			p += fmt.Sprintf(" (fleet %.0f)", m.LatencyP95Ms)
		}
	}
	c := func(tag string) string { return fmt.Sprintf("%d/%d", second[tag].allowed, second[tag].denied) }
	st := s.fleet[0].Stats()
	version := fmt.Sprintf("v%d", st.PolicyVersion)
	if len(st.LocalRulesFired) > 0 {
		version += " local"
	}
	mark := " "
	if s.changed.Swap(false) {
		mark = "*"
	}
	fmt.Printf("%5.0fs%s %-8s  %-10s  %-8s  %-14s  %-13s  %-20s  %-21s  %v\n",
		time.Since(s.start).Seconds(), mark, phase, st.Mode, version, c("free"), c("pro"), c("enterprise"), p, st.PulseInterval)
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
	if r := s.restarted; r != nil && !s.restSafe && r.Mode() == waitstate.ModeSafeMode {
		s.restSafe = true
		s.line("instance %d (restarted): the lease New gave it has run out; it runs the restored rules itself, fired as they were: %s",
			len(s.fleet), strings.Join(r.Stats().LocalRulesFired, ", "))
	}
	// One reading of the first instance per tick: the lines below agree
	// with each other.
	c := s.fleet[0]
	st := c.Stats()
	m, p, pulse, fired := st.Mode, c.Policy(), st.PulseInterval, st.LocalRulesFired
	if m != s.mode {
		switch m {
		case waitstate.ModeSafeMode:
			switch s.base.SafeMode {
			case waitstate.SafeModeLocalRules:
				s.line("lease expired: SAFE MODE (%s): each instance now runs the rules itself, on its own samples", s.base.SafeMode)
				s.milestone("safe mode, local rules")
			case waitstate.SafeModeFixedRPS:
				s.line("lease expired: SAFE MODE (%s), each instance admits at most %d calls/s whatever the tag: enterprise now competes with free for them", s.base.SafeMode, s.base.SafeModeMaxRPS)
				s.milestone("safe mode")
			default:
				s.line("lease expired: SAFE MODE (%s)", s.base.SafeMode)
				s.milestone("safe mode")
			}
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
	if !slices.Equal(fired, s.localFired) {
		switch {
		case len(fired) > 0 && s.mode == waitstate.ModeSafeMode && len(s.localFired) == 0 && !slices.Contains(s.milestones, "local rules cleared"):
			s.line("instance 1 keeps fired the rules the control plane had fired: %s; enterprise passes", strings.Join(fired, ", "))
		case len(fired) > 0:
			s.line("instance 1 FIRED the rules LOCALLY on its own enterprise p95 (%s): free is BLOCKED and pro THROTTLED with no control plane; enterprise passes",
				strings.Join(fired, ", "))
			s.milestone("free blocked locally")
		case s.mode == waitstate.ModeSafeMode:
			s.line("instance 1 cleared its local rules after their cooldown: free and pro pass again")
			s.milestone("local rules cleared")
		}
		s.localFired = fired
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
	if p.Version != s.version {
		s.version = p.Version
		s.line("instances apply policy v%d: %s", p.Version, describe(p))
	}
	protected := p.TagShedPercents["free"] == 100 && p.TagShedPercents["pro"] == 50
	if s.rec != nil {
		now := time.Now()
		s.rec.mark(bandFired, m == waitstate.ModeEnforcing && protected, now)
		s.rec.mark(bandSafe, m == waitstate.ModeSafeMode, now)
		s.rec.mark(bandLocal, m == waitstate.ModeSafeMode && protected, now)
		if r := s.restarted; r != nil {
			s.rec.mark(bandRestored, r.Stats().Restored, now)
		}
	}
	if m != waitstate.ModeEnforcing {
		return
	}
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
	if !s.quiet {
		fmt.Printf("  → %5.1fs  %s\n", time.Since(s.start).Seconds(), fmt.Sprintf(format, args...))
		s.changed.Store(true)
	}
}

func (s *simulation) milestone(m string) { s.milestones = append(s.milestones, m) }

// describe sums up a policy's limits and shedding.
func describe(p *waitstate.Policy) string {
	parts := []string{fmt.Sprintf("global max weight %v", p.GlobalMaxWeight)}
	if math.IsInf(p.GlobalMaxWeight, 1) {
		parts[0] += " (no weight limit)"
	}
	for _, tag := range slices.Sorted(maps.Keys(p.TagMaxWeights)) {
		parts = append(parts, fmt.Sprintf("%s max weight %v", tag, p.TagMaxWeights[tag]))
	}
	for _, tag := range slices.Sorted(maps.Keys(p.TagShedPercents)) {
		parts = append(parts, fmt.Sprintf("%s shed %v %%", tag, p.TagShedPercents[tag]))
	}
	return strings.Join(parts, ", ")
}

// totals adds up the fleet's own counts, restarted instances included.
func (s *simulation) totals() (usage, bounced uint64, sent, failed uint64) {
	for _, c := range s.clients() {
		st := c.Stats()
		usage, bounced, sent, failed = usage+st.Usage, bounced+st.Bounced, sent+st.PulsesSent, failed+st.PulsesFailed
	}
	return
}

func (s *simulation) summary() {
	usage, bounced, sent, failed := s.totals()
	fmt.Println()
	fmt.Printf("In %.0f s, %d instances (%d processes) gated %d requests (%d allowed, %d denied) from memory, never waiting on the network; "+
		"they sent %d pulses (%d attempts failed and were resent unchanged until acknowledged). ",
		time.Since(s.start).Seconds(), len(s.fleet), len(s.clients()), usage+bounced, usage, bounced, sent, failed)
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
		"safe mode, local rules", "restored", "local rules cleared", "free blocked locally", "enterprise passed throughout the outage",
		"enforcing again"}
	for _, w := range want {
		if !slices.Contains(s.milestones, w) {
			return fmt.Errorf("the run did not show %q (it showed: %s)", w, strings.Join(s.milestones, ", "))
		}
	}
	for _, chain := range [][]string{
		{"free blocked, pro throttled, enterprise passes", "free and pro restored", "safe mode, local rules", "restored", "enforcing again"},
		{"safe mode, local rules", "local rules cleared", "free blocked locally", "enterprise passed throughout the outage", "enforcing again"},
	} {
		for i := range len(chain) - 1 {
			if slices.Index(s.milestones, chain[i]) > slices.Index(s.milestones, chain[i+1]) {
				return fmt.Errorf("the story ran out of order (%q after %q): %s", chain[i], chain[i+1], strings.Join(s.milestones, ", "))
			}
		}
	}
	if n := s.restarted.Stats().Decisions[waitstate.ReasonFailOpen]; n != 0 {
		return fmt.Errorf("the restarted instance failed open %d times", n)
	}
	usage, bounced, _, _ := s.totals()
	if t := s.srv.Totals(""); usage != t.Usage || bounced != t.Bounced {
		return fmt.Errorf("counts differ: instances %d/%d, control plane %d/%d", usage, bounced, t.Usage, t.Bounced)
	}
	return nil
}

// compare runs compareScript once under each safe-mode strategy, on an
// embedded control plane of its own each time, and prints what each let
// through during the spike, as a Markdown table.
func compare(ctx context.Context) error {
	if os.Getenv(waitstate.EnvPublishKey) != "" || os.Getenv(waitstate.EnvSecretKey) != "" {
		return errors.New("-compare takes the control plane down, so it runs on the embedded one only: unset WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY")
	}
	fmt.Printf("The same outage under each safe-mode strategy: %d instances, free %v/s, pro %v/s, enterprise %v/s; the control plane\n"+
		"goes down, every lease runs out, then free spikes to %v/s for %v. Figures are over the spike.\n\n",
		instances, tags[0].rate, tags[1].rate, tags[2].rate, tags[0].rate*compareScript[2].freeScale, compareScript[2].length)
	fmt.Println("| `SafeMode` | enterprise admitted | free admitted | pro admitted | enterprise p95 | enterprise p50 |")
	fmt.Println("|---|---:|---:|---:|---:|---:|")
	for _, strategy := range []waitstate.SafeModeStrategy{waitstate.SafeModeFixedRPS, waitstate.SafeModeLastPolicy,
		waitstate.SafeModeOpen, waitstate.SafeModeLocalRules} {
		m, err := outage(ctx, strategy)
		if err != nil {
			return err
		}
		pct := func(tag string) string {
			c := m.counts[tag]
			return fmt.Sprintf("%.0f %%", 100*float64(c.allowed)/float64(max(c.allowed+c.denied, 1)))
		}
		name := strategy.String()
		if strategy == waitstate.SafeModeFixedRPS {
			name += fmt.Sprintf(" (%d/s each)", 20)
		}
		fmt.Printf("| `%s` | %s | %s | %s | %.0f ms | %.0f ms |\n", name, pct("enterprise"), pct("free"), pct("pro"),
			quantile(m.entMs, 0.95), quantile(m.entMs, 0.5))
	}
	fmt.Printf("\n`fixed_rps` admits %d calls/s per instance whatever the tag, so during the spike enterprise gets only its share\n"+
		"of them: most calls are free's. The admitted shares are of the calls each tier sent, summed over the fleet.\n", 20)
	return nil
}

// outage runs compareScript on a fresh fleet in safe mode strategy.
func outage(ctx context.Context, strategy waitstate.SafeModeStrategy) (*measure, error) {
	srv, opts, err := embedded(strategy)
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	sim := newSimulation(srv, opts)
	sim.quiet = true
	defer sim.close()
	for range instances {
		if err := sim.add(opts); err != nil {
			return nil, err
		}
	}
	sim.ready(ctx)
	err = sim.run(ctx, compareScript)
	sim.work.Wait() // the requests in flight are timed into the measure
	m := sim.meas   // only run writes it, and run has returned
	if err == nil && m == nil {
		err = errors.New("nothing was measured")
	}
	return m, err
}
