package controlplane

// boundedLog keeps the newest entries appended to it, within a count and a
// byte budget: a control plane left running logs forever in fixed memory.
type boundedLog[T any] struct {
	entries []T
	costs   []int
	head    int // index of the oldest entry in the ring
	n       int // entries held
	bytes   int // sum of their costs
	seq     uint64
}

// add appends v, which costs about cost bytes, dropping the oldest entries
// beyond limit entries or budget bytes. An entry over the budget by itself
// is not kept.
func (l *boundedLog[T]) add(v T, cost, limit, budget int) {
	l.seq++
	if limit <= 0 || cost > budget {
		return
	}
	if len(l.entries) != limit {
		l.resize(limit)
	}
	for l.n > 0 && (l.n >= limit || l.bytes+cost > budget) {
		l.dropOldest()
	}
	i := (l.head + l.n) % limit
	l.entries[i], l.costs[i] = v, cost
	l.n++
	l.bytes += cost
}

func (l *boundedLog[T]) dropOldest() {
	var zero T
	l.entries[l.head] = zero
	l.bytes -= l.costs[l.head]
	l.head = (l.head + 1) % len(l.entries)
	l.n--
}

// resize changes the count limit, keeping the newest entries.
func (l *boundedLog[T]) resize(limit int) {
	old := l.all()
	costs := make([]int, 0, l.n)
	for i := range l.n {
		costs = append(costs, l.costs[(l.head+i)%len(l.costs)])
	}
	if len(old) > limit {
		old, costs = old[len(old)-limit:], costs[len(costs)-limit:]
	}
	l.entries, l.costs = make([]T, limit), make([]int, limit)
	copy(l.entries, old)
	copy(l.costs, costs)
	l.head, l.n, l.bytes = 0, len(old), 0
	for _, c := range costs {
		l.bytes += c
	}
}

// all returns a copy of the entries held, oldest first.
func (l *boundedLog[T]) all() []T {
	out := make([]T, 0, l.n)
	for i := range l.n {
		out = append(out, l.entries[(l.head+i)%len(l.entries)])
	}
	return out
}
