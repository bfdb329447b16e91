package controlplane

import (
	"math"
	"time"
)

// Counting each pulse exactly once. A pulse is named by (instance,
// incarnation, seq): the instance ID is the name a user gave (often shared
// by two processes on one host), the incarnation is the 128 random bits a
// client draws once per New, and seq numbers that process's pulses from 1.
// So two processes that share an instance ID, or one that restarted, have
// separate seq streams, and no heuristic is needed to tell them apart. A
// pulse without an incarnation (from an SDK before it was sent) belongs to
// the instance's one incarnation "".
//
// What a site keeps stays bounded by its live processes, not by how often
// they restart (see the invariants in state.go):
//
//  1. Each incarnation keeps a fixed-size record (seen): its highest seq
//     counted and a bitmap of the dedupeSpan seqs below it.
//  2. An instance keeps at most maxIncarnations incarnations; a new one
//     beyond that evicts the one that pulsed least recently.
//  3. An incarnation silent for longer than idleAfter (10 × the longest
//     lease it can hold) is forgotten, and an instance with none left with
//     it, by a sweep that runs at most once per sweepEvery of the site's
//     pulses, and of its key's requests (forgetIdle).
//
//  4. An instance's latest is the incarnation that pulsed last (nil once
//     forgotten): most pulses come from it, and are found without a map
//     lookup. Another incarnation that pulses, having pulsed before, was
//     therefore overtaken by latest: two processes pulse at once.
//
// A forgotten incarnation that pulses again starts a new record: a resend
// of a pulse counted before it was forgotten would count twice. Both bounds
// are far beyond what a live process needs: it resends only until
// acknowledged, and pulses every interval.

// dedupeSpan is how many seqs below an incarnation's highest one are told
// apart; older ones count as seen.
const dedupeSpan = 64

// maxIncarnations bounds the processes one instance ID keeps records for.
const maxIncarnations = 8

// sweepEvery is how often, at most, a site looks for idle incarnations.
const sweepEvery = time.Minute

// defaultClientLease is the lease a client holds when the control plane
// names none and its windows say nothing longer: 3 × the SDK's default
// sync interval.
const defaultClientLease = 90 * time.Second

// seen records which of one incarnation's pulses were counted.
type seen struct {
	high uint64 // the highest seq counted
	bits uint64 // bit i: seq high-1-i was counted
}

// fresh reports whether the pulse with seq is to be counted, and records it.
func (d *seen) fresh(seq uint64) bool {
	switch {
	case seq > d.high:
		shift := seq - d.high
		if shift > dedupeSpan || d.high == 0 {
			d.bits = 0
		} else {
			d.bits = d.bits<<shift | 1<<(shift-1) // the old high moves into the bitmap
		}
		d.high = seq
		return true
	case seq == d.high:
		return false
	case d.high-seq > dedupeSpan:
		return false
	default:
		bit := uint64(1) << (d.high - seq - 1)
		if d.bits&bit != 0 {
			return false
		}
		d.bits |= bit
		return true
	}
}

// incarnation is one process's record under an instance ID.
type incarnation struct {
	seen   seen
	last   time.Time     // when it last pulsed (a resend included)
	gap    time.Duration // the time between its last two pulses' arrivals; 0 after its first
	order  uint64        // the site's pulse count then: orders pulses that share a clock reading
	window time.Duration // the longest window it reported
}

// instance is what a site keeps of one instance ID.
type instance struct {
	incarnations map[string]*incarnation // by incarnation; at most maxIncarnations
	latest       *incarnation            // the one that pulsed last (invariant 4); nil once forgotten
	latestName   string                  // its name
	shared       bool                    // two of them were seen pulsing at once (logged once)
}

// idleAfter is how long inc may stay silent before it is forgotten: 10 ×
// the longest lease it can hold. That is the lease the control plane sends
// or, when it sends none, the client's default of 3 × its longer interval,
// of which the control plane sees the pulse windows.
func idleAfter(cfg *resolved, inc *incarnation) time.Duration {
	lease := cfg.leaseTTL
	if lease <= 0 {
		lease = max(3*max(cfg.pulseEvery, cfg.syncEvery, inc.window), defaultClientLease)
	}
	return 10 * max(lease, 3*inc.window)
}

// dedupe reports whether p is to be counted and records it, and returns
// the record of p's process; shared is true the first time p shows two
// processes pulsing under one instance ID at once: p's incarnation had
// pulsed before, and another has pulsed since. Call with st.mu held.
func (st *siteState) dedupe(p *Pulse, cfg *resolved, now time.Time) (inc *incarnation, fresh, shared bool) {
	st.sweep(cfg, now)
	in := st.instances[p.InstanceID]
	if in == nil {
		in = &instance{incarnations: map[string]*incarnation{}}
		st.instances[p.InstanceID] = in
	}
	if in.latest != nil && in.latestName == p.Incarnation {
		inc = in.latest
	} else {
		inc = in.incarnations[p.Incarnation]
		switch {
		case inc == nil:
			if len(in.incarnations) >= maxIncarnations {
				in.evictIdlest()
			}
			inc = &incarnation{}
			in.incarnations[p.Incarnation] = inc
		case !in.shared && in.latest != nil:
			in.shared, shared = true, true // it pulsed before, and latest since
		}
		in.latest, in.latestName = inc, p.Incarnation
	}
	st.order++
	if inc.gap = 0; !inc.last.IsZero() {
		inc.gap = now.Sub(inc.last)
	}
	inc.last, inc.order = now, st.order
	inc.window = max(inc.window, time.Duration(max(p.WindowMs, 0))*time.Millisecond)
	return inc, inc.seen.fresh(p.Seq), shared
}

// evictIdlest forgets the incarnation that pulsed least recently.
func (in *instance) evictIdlest() {
	var idlest string
	order := uint64(math.MaxUint64)
	for name, inc := range in.incarnations {
		if inc.order < order {
			idlest, order = name, inc.order
		}
	}
	if in.latest == in.incarnations[idlest] {
		in.latest = nil
	}
	delete(in.incarnations, idlest)
}

// sweep forgets the site's idle incarnations, and the instances left with
// none, at most once per sweepEvery. Call with st.mu held.
func (st *siteState) sweep(cfg *resolved, now time.Time) {
	if now.Sub(st.swept) < sweepEvery {
		return
	}
	st.swept = now
	for id, in := range st.instances {
		for name, inc := range in.incarnations {
			if now.Sub(inc.last) > idleAfter(cfg, inc) {
				if in.latest == inc {
					in.latest = nil
				}
				delete(in.incarnations, name)
			}
		}
		if len(in.incarnations) == 0 {
			delete(st.instances, id)
		}
	}
}
