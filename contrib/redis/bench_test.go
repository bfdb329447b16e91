//go:build unix

package waitstateredis_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/waitstate/waitstate-go"
	waitstateredis "github.com/waitstate/waitstate-go/contrib/redis"
)

// benchSnapshot is a snapshot of a policy with 50 tags, about 2.5 KB: a
// service's usual size.
func benchSnapshot(b *testing.B, received, version int64) []byte {
	b.Helper()
	tags := make([]string, 50)
	for i := range tags {
		tags[i] = fmt.Sprintf(`"tenant-%03d":%d`, i, 100+i)
	}
	body := fmt.Sprintf(`{"policy":{"version":%d,"globalMaxWeight":1000,"tagMaxWeights":{%s}},"leaseTtlMs":30000}`,
		version, strings.Join(tags, ","))
	data := fmt.Appendf(nil, `{"format":"waitstate-snapshot/1","publishKey":"pk_live","siteId":"eu","instanceId":"pod-7f9c",`+
		`"path":"/v1/policy","nonce":"0123456789abcdef0123456789abcdef","signature":"%s","body":"%s","receivedMs":%d,"seal":"%s"}`,
		strings.Repeat("a", 64), base64.StdEncoding.EncodeToString([]byte(body)), received, strings.Repeat("b", 64))
	_, err := waitstate.ReadSnapshotInfo(data)
	require.NoError(b, err)
	return data
}

// BenchmarkLoad: Load against a local redis-server, beside a plain HGET of
// the same field (the peer: what a store without the size check costs).
func BenchmarkLoad(b *testing.B) {
	s := startRedis(b)
	rdb := s.client()
	store := waitstateredis.NewStore(rdb, "bench")
	require.NoError(b, store.Save(context.Background(), benchSnapshot(b, time.Now().UnixMilli(), 1)))
	b.Run("store", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := store.Load(context.Background()); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("store/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := store.Load(context.Background()); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("peer=HGET", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := rdb.HGet(context.Background(), "bench", "snapshot").Bytes(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSave: Save of a newer snapshot each time (the compare-and-set
// writes), of the one held (it compares and keeps it), beside a plain HSET
// of the same fields (the peer: the last save wins, whatever it brings).
func BenchmarkSave(b *testing.B) {
	s := startRedis(b)
	rdb := s.client()
	store := waitstateredis.NewStore(rdb, "bench")
	base := time.Now().Add(-time.Hour).UnixMilli()
	snaps := make([][]byte, 1024) // received 1 ms apart
	for i := range snaps {
		snaps[i] = benchSnapshot(b, base+int64(i), 1)
	}
	save := func(b *testing.B, snap []byte) {
		if err := store.Save(context.Background(), snap); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("store/newer", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if i%len(snaps) == 0 { // start the series again on an empty key
				b.StopTimer()
				require.NoError(b, rdb.Del(context.Background(), "bench").Err())
				b.StartTimer()
			}
			save(b, snaps[i%len(snaps)])
			i++
		}
	})
	b.Run("store/held", func(b *testing.B) {
		save(b, snaps[len(snaps)-1])
		b.ReportAllocs()
		for b.Loop() {
			save(b, snaps[len(snaps)-1])
		}
	})
	b.Run("store/held/parallel", func(b *testing.B) {
		save(b, snaps[len(snaps)-1])
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := store.Save(context.Background(), snaps[len(snaps)-1]); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("peer=HSET", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			err := rdb.HSet(context.Background(), "bench-peer", "snapshot", snaps[i%len(snaps)],
				"receivedMs", base+int64(i%len(snaps)), "version", 1).Err()
			if err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}
