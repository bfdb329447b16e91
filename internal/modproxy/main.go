// Command modproxy writes a Go module proxy, as a directory, that serves
// modules of this repository at one version from the working tree: what
// the module proxy would serve once the tree is tagged. CI points a module
// outside the repository at it (GOPROXY=file://DIR,...) to check that the
// modules resolve for a user as released, with no replace directive.
//
//	go run ./internal/modproxy -out DIR -version v0.3.0 . contrib/prometheus ...
//
// Each argument is a module's directory. A module's zip holds the files
// under its directory, less those of nested modules, hidden files and
// directories, as the go command does when it zips a tagged module.
package main

import (
	"archive/zip"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

func main() {
	out := flag.String("out", "", "the directory to write the proxy into")
	version := flag.String("version", "", "the version to serve every module at, such as v0.3.0")
	flag.Parse()
	if *out == "" || !strings.HasPrefix(*version, "v") || flag.NArg() == 0 {
		log.Fatal("usage: modproxy -out DIR -version vX.Y.Z MODULE_DIR...")
	}
	for _, dir := range flag.Args() {
		if err := write(*out, *version, dir); err != nil {
			log.Fatalf("modproxy: %s: %v", dir, err)
		}
	}
}

// write adds the module in dir to the proxy in out, at version.
func write(out, version, dir string) error {
	mod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return err
	}
	modPath := modulePath(mod)
	if modPath == "" {
		return errors.New("go.mod names no module")
	}
	at := filepath.Join(out, escape(modPath), "@v")
	if err := os.MkdirAll(at, 0o755); err != nil {
		return err
	}
	info, err := json.Marshal(struct {
		Version string
		Time    time.Time
	}{version, time.Now().UTC().Truncate(time.Second)})
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{
		"list":            []byte(version + "\n"),
		version + ".info": info,
		version + ".mod":  mod,
	} {
		if err := os.WriteFile(filepath.Join(at, name), data, 0o644); err != nil {
			return err
		}
	}
	return zipModule(filepath.Join(at, version+".zip"), modPath+"@"+version, dir)
}

// zipModule writes the module in dir as a module zip, its files under
// prefix.
func zipModule(file, prefix, dir string) (err error) {
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	zw := zip.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		if strings.HasPrefix(d.Name(), ".") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			if _, err := os.Stat(filepath.Join(p, "go.mod")); err == nil {
				return filepath.SkipDir // a nested module: not part of this one
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		w, err := zw.Create(path.Join(prefix, filepath.ToSlash(rel)))
		if err != nil {
			return err
		}
		src, err := os.Open(p)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(w, src)
		return err
	})
	if err != nil {
		return err
	}
	return zw.Close()
}

// modulePath reads the module path from a go.mod file.
func modulePath(mod []byte) string {
	for _, line := range strings.Split(string(mod), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	return ""
}

// escape is the proxy protocol's case encoding of a module path: each
// upper-case letter becomes '!' and its lower case.
func escape(modPath string) string {
	var b strings.Builder
	for _, r := range modPath {
		if 'A' <= r && r <= 'Z' {
			fmt.Fprintf(&b, "!%c", r+'a'-'A')
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}
