package waitstateredis_test

import (
	"log"
	"os"

	"github.com/redis/go-redis/v9"

	"github.com/waitstate/waitstate-go"
	waitstateredis "github.com/waitstate/waitstate-go/contrib/redis"
)

// A fleet shares one snapshot per site: every instance saves the control
// plane's answers, and one started while the control plane is away starts
// with the fleet's last policy and rules. ContextTimeoutEnabled lets a
// stalled Redis free its connection at the deadline, not only the call.
func ExampleNewStore() {
	opts, err := waitstate.OptionsFromEnv()
	if err != nil {
		log.Fatal(err)
	}
	rdb := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:                 []string{os.Getenv("REDIS_ADDR")}, // one address: a single node; several: a cluster
		ContextTimeoutEnabled: true,
	})
	defer rdb.Close()
	opts.PolicyStore = waitstateredis.NewStore(rdb, "waitstate:snapshot:"+opts.SiteID)
	opts.SafeMode = waitstate.SafeModeLocalRules // and once the lease runs out, the rules run here

	client, err := waitstate.New(opts)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	_ = client.Gate("free", 1)
}
