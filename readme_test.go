package waitstate

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestReadmeQuickStartCompiles: the README's quick start is the body of
// Example_quickStart, which the tests compile.
func TestReadmeQuickStartCompiles(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	require.NoError(t, err)
	_, rest, ok := strings.Cut(string(readme), "## Quick start\n\n```go\n")
	require.True(t, ok, "the README has a Quick start section with a Go snippet")
	snippet, _, _ := strings.Cut(rest, "```\n")

	example, err := os.ReadFile("example_more_test.go")
	require.NoError(t, err)
	_, rest, ok = strings.Cut(string(example), "func Example_quickStart() {\n")
	require.True(t, ok)
	body, _, _ := strings.Cut(rest, "\n}\n")
	var dedented []string
	for _, line := range strings.Split(body, "\n") {
		dedented = append(dedented, strings.TrimPrefix(line, "\t"))
	}
	require.Equal(t, strings.Join(dedented, "\n")+"\n", snippet, "the README's quick start and Example_quickStart differ")
}
