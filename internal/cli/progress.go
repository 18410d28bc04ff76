package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerhq/banger/internal/api"
)

// progressView renders a long operation's events: on a terminal, one line
// redrawn in place with a progress bar; otherwise plain lines, one per step
// or message, fit for logs and pipes.
type progressView struct {
	mu    sync.Mutex // guards the fields below
	w     io.Writer
	tty   bool
	step  string
	start time.Time
	drawn bool
}

func newProgressView(w io.Writer) *progressView {
	return &progressView{w: w, tty: isTerminal(w), start: time.Now()}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// event is a client.ProgressFunc.
func (p *progressView) event(e api.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	step := ""
	if e.Progress != nil {
		step = e.Progress.Step
	}
	if !p.tty {
		switch {
		case e.Message != "" && step != "":
			_, _ = fmt.Fprintf(p.w, "%s: %s\n", step, e.Message)
		case e.Message != "":
			_, _ = fmt.Fprintln(p.w, e.Message)
		case step != "" && step != p.step:
			_, _ = fmt.Fprintf(p.w, "%s\n", step)
		}
		if step != "" {
			p.step = step
		}
		return
	}
	if step != "" {
		p.step = step
	}
	line := fmt.Sprintf("%5.1fs %s", time.Since(p.start).Seconds(), p.step)
	if e.Progress != nil && e.Progress.Total > 0 {
		line += " " + bar(e.Progress.Done, e.Progress.Total, 24) + " " + amount(e.Progress)
	}
	if e.Message != "" {
		line += "  " + oneLine(e.Message)
	}
	if e.Type == "vm.notice" {
		// Notices stay on screen.
		p.clearLocked()
		_, _ = fmt.Fprintln(p.w, "note: "+e.Message)
		return
	}
	_, _ = fmt.Fprint(p.w, "\r\033[K"+truncate(line, 120))
	p.drawn = true
}

func (p *progressView) clearLocked() {
	if p.drawn {
		_, _ = fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
}

// done removes the progress line.
func (p *progressView) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clearLocked()
}

func bar(done, total int64, width int) string {
	if done > total {
		done = total
	}
	n := int(float64(width) * float64(done) / float64(total))
	return "[" + strings.Repeat("#", n) + strings.Repeat("-", width-n) + "]" + fmt.Sprintf(" %3d%%", done*100/total)
}

func amount(p *api.Progress) string {
	if p.Unit == "bytes" {
		return api.FormatSize(p.Done) + "/" + api.FormatSize(p.Total)
	}
	return fmt.Sprintf("%d/%d %s", p.Done, p.Total, p.Unit)
}

func oneLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n-1] + "…"
	}
	return s
}
