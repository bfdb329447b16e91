// Command controlplane runs the reference WaitState control plane as a
// process on loopback, so that several local services can share one fleet:
// it verifies signatures and tokens, aggregates pulses per site, runs
// reflex rules and serves the resulting policies.
//
//	go run ./examples/controlplane -rules examples/controlplane/rules.json
//
// It accepts the key pair in WAITSTATE_PUBLISH_KEY and WAITSTATE_SECRET_KEY,
// or the secret in a file named by -secret-key-file (never the secret
// itself as a flag: flags show in ps), and prints only the publish key and
// URL for the services; without them it generates a pair and prints both,
// since no one else knows that secret. It is a development tool: it keeps
// its state in memory, listens on loopback unless -addr says otherwise, and
// warns loudly when it does not.
//
// It serves a live page of the fleet on -ui (127.0.0.1:8788 by default,
// with the same warning beyond loopback): per site, the instances by mode,
// each tag's calls a second and p95, the policy in force, each rule's state
// and timeline, and charts of the last five minutes. The page is embedded
// in the binary and loads nothing from elsewhere.
//
// A rules file is a JSON array of rules for every site, or an object from
// site to its array of rules; rules.json beside this file is an example:
//
//	[{"name": "protect-enterprise", "metricTag": "enterprise", "metric": "latency_p95_ms",
//	  "operator": ">", "threshold": 300, "tagName": "free", "action": "block", "cooldownSeconds": 30}]
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/waitstate/waitstate-go"
	"github.com/waitstate/waitstate-go/internal/controlplane"
	"github.com/waitstate/waitstate-go/internal/dashboard"
)

func main() {
	var (
		addr       = flag.String("addr", "127.0.0.1:8787", "address to listen on")
		uiAddr     = flag.String("ui", "127.0.0.1:8788", `address of the live page of the fleet ("" for none)`)
		rulesFile  = flag.String("rules", "", "JSON file of reflex rules")
		policyFile = flag.String("policy", "", "JSON file of the base policy (default: version 1, unlimited)")
		lease      = flag.Duration("lease", 0, "lease of every answer (default: the clients' own, 3 × their longer interval)")
		window     = flag.Duration("rule-window", controlplane.DefaultRuleWindow, "how far back the rules look")
		every      = flag.Duration("status", 5*time.Second, "how often to print the fleet's figures")
		secretFile = flag.String("secret-key-file", "", "file holding the secret key (instead of "+waitstate.EnvSecretKey+")")
	)
	flag.Parse()
	secret, err := secretKey(*secretFile)
	if err != nil {
		log.Fatal(err)
	}
	if err := run(*addr, *uiAddr, *rulesFile, *policyFile, os.Getenv(waitstate.EnvPublishKey), secret, *lease, *window, *every); err != nil {
		log.Fatal(err)
	}
}

// secretKey returns the secret key from file, or else from the
// environment. An error never shows the secret.
func secretKey(file string) (string, error) {
	env := os.Getenv(waitstate.EnvSecretKey)
	if file == "" {
		return env, nil
	}
	if env != "" {
		return "", fmt.Errorf("set %s or -secret-key-file, not both", waitstate.EnvSecretKey)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("secret key file: %w", err)
	}
	secret := strings.TrimSpace(string(data))
	if secret == "" || strings.ContainsAny(secret, " \t\r\n") {
		return "", fmt.Errorf("secret key file %s: want one key on one line", file)
	}
	return secret, nil
}

func run(addr, uiAddr, rulesFile, policyFile, publishKey, secretKey string, lease, window, every time.Duration) error {
	if (publishKey == "") != (secretKey == "") {
		return fmt.Errorf("set both %s and the secret key (%s or -secret-key-file), or neither", waitstate.EnvPublishKey, waitstate.EnvSecretKey)
	}
	generated := publishKey == ""
	if generated {
		publishKey, secretKey = "pk_local_"+randomHex(), "sk_local_"+randomHex()
	}
	cp := controlplane.NewUnstarted()
	defer cp.Close()
	cp.AddKey(publishKey, secretKey)
	cp.SetLogger(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	cp.SetLeaseTTL(lease)
	cp.SetRuleWindow(window)

	base := controlplane.Policy{Version: 1, GlobalMaxWeight: math.Inf(1)}
	if policyFile != "" {
		data, err := os.ReadFile(policyFile)
		if err != nil {
			return err
		}
		var p waitstate.Policy // the SDK's own parser: what clients will accept
		if err := json.Unmarshal(data, &p); err != nil {
			return fmt.Errorf("%s: %w", policyFile, err)
		}
		base = controlplane.Policy{Version: p.Version, GlobalMaxWeight: p.GlobalMaxWeight, TagMaxWeights: p.TagMaxWeights,
			GlobalShedPercent: p.GlobalShedPercent, TagShedPercents: p.TagShedPercents}
	}
	cp.SetPolicy("", base)
	if rulesFile != "" {
		data, err := os.ReadFile(rulesFile)
		if err != nil {
			return err
		}
		bySite, err := controlplane.ParseRules(data)
		if err != nil {
			return fmt.Errorf("%s: %w", rulesFile, err)
		}
		for site, rules := range bySite {
			if err := cp.SetRules(site, rules...); err != nil {
				return err
			}
			fmt.Printf("site %q: %d rules\n", site, len(rules))
		}
	}

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	server := &http.Server{Handler: cp.Handler()}
	controlplane.DefaultTimeouts.Apply(server)
	served := make(chan error, 2)
	go func() { served <- server.Serve(ln) }()
	fmt.Printf("WaitState control plane on http://%s\n", ln.Addr())
	if ip := ln.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
		fmt.Fprintf(os.Stderr, "\n*** WARNING: listening on %s, beyond loopback. This is a development control plane:\n"+
			"*** anyone who can reach it and holds the key pair can read and set this fleet's policies. ***\n\n", ln.Addr())
	}
	servers := []*http.Server{server}
	if uiAddr != "" {
		uiLn, err := net.Listen("tcp", uiAddr)
		if err != nil {
			return fmt.Errorf("the live page: %w", err)
		}
		d := dashboard.New(cp)
		sampling, stopSampling := context.WithCancel(context.Background())
		defer stopSampling()
		go d.Run(sampling)
		ui := &http.Server{Handler: d.Handler()}
		controlplane.DefaultTimeouts.Apply(ui)
		servers = append(servers, ui)
		go func() { served <- ui.Serve(uiLn) }()
		fmt.Printf("live page of the fleet on http://%s\n", uiLn.Addr())
		if ip := uiLn.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
			fmt.Fprintf(os.Stderr, "\n*** WARNING: the live page listens on %s, beyond loopback. This is a development control plane:\n"+
				"*** anyone who can reach it sees this fleet's sites, tags, policies and rules (never a key). ***\n\n", uiLn.Addr())
		}
	}
	fmt.Println()
	if generated {
		fmt.Printf("export %s=%s\nexport %s=%s\nexport %s=http://%s\n\n",
			waitstate.EnvPublishKey, publishKey, waitstate.EnvSecretKey, secretKey, waitstate.EnvBaseURL, ln.Addr())
	} else {
		// The secret came from the environment: it is not echoed.
		fmt.Printf("export %s=%s\nexport %s=<as set for this control plane>\nexport %s=http://%s\n\n",
			waitstate.EnvPublishKey, publishKey, waitstate.EnvSecretKey, waitstate.EnvBaseURL, ln.Addr())
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	t := time.NewTicker(every)
	defer t.Stop()
	var seen uint64 // the Seq of the last event printed
	for {
		select {
		case err := <-served:
			return err
		case <-ctx.Done():
			fmt.Println("shutting down")
			cp.Close() // releases any request held by a fault
			shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var errs []error
			for _, srv := range servers {
				errs = append(errs, srv.Shutdown(shutdownCtx))
			}
			return errors.Join(errs...)
		case <-t.C:
			for _, e := range cp.Events() {
				if e.Seq <= seen {
					continue
				}
				seen = e.Seq
				state := "cleared"
				if e.Fired {
					state = fmt.Sprintf("fired (%.1f)", e.Value)
				}
				fmt.Printf("%s site %q rule %q %s → policy v%d\n", e.At.Format(time.TimeOnly), e.Site, e.Rule, state, e.Version)
			}
			status(cp)
		}
	}
}

// status prints each site's figures over the rule window.
func status(cp *controlplane.Server) {
	for _, site := range cp.Sites() {
		m := cp.Metrics(site)
		p, _ := cp.Policy(site)
		fmt.Printf("%s site %q: %d instances, %.0f calls/s, p95 %.0f ms, errors %.1f %%, policy v%d\n",
			time.Now().Format(time.TimeOnly), site, m.Instances, m.RPS, m.LatencyP95Ms, 100*m.ErrorRate, p.Version)
	}
}

func randomHex() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
