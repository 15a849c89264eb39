// Package mlog is a minimal stand-in for monis.app/mlog (see go.mod): leveled, JSON-formatted
// logging through logr. Levels, as the peer's --log-level flag names them: "" (warnings and
// errors only, the default), info, debug, trace, all. Messages below the level cost one atomic
// load, as in the original, so the peer's hot path is not slowed down by disabled logging.
package mlog

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

// LogLevel is a --log-level value.
type LogLevel string

// LogFormat is the output format; only JSON is produced.
type LogFormat string

const (
	LevelWarning LogLevel = ""
	LevelInfo    LogLevel = "info"
	LevelDebug   LogLevel = "debug"
	LevelTrace   LogLevel = "trace"
	LevelAll     LogLevel = "all"

	FormatJSON LogFormat = "json"
	FormatText LogFormat = "text"
)

// LogSpec is what ValidateAndSetLogLevelAndFormatGlobally takes.
type LogSpec struct {
	Level  LogLevel
	Format LogFormat
}

// rank orders the levels; a message is written when its rank <= the global rank.
func rank(l LogLevel) (int32, bool) {
	switch l {
	case LevelWarning:
		return 0, true
	case LevelInfo:
		return 1, true
	case LevelDebug:
		return 2, true
	case LevelTrace:
		return 3, true
	case LevelAll:
		return 4, true
	}
	return 0, false
}

var global atomic.Int32

var sink = funcr.NewJSON(func(obj string) { fmt.Fprintln(os.Stderr, obj) },
	funcr.Options{LogTimestamp: true, Verbosity: 10})

// ValidateAndSetLogLevelAndFormatGlobally sets the level for every logger.
func ValidateAndSetLogLevelAndFormatGlobally(_ context.Context, spec LogSpec) error {
	r, ok := rank(spec.Level)
	if !ok {
		return fmt.Errorf("unknown log level %q", spec.Level)
	}
	global.Store(r)
	return nil
}

// Enabled reports whether messages of this level are written.
func Enabled(l LogLevel) bool {
	r, ok := rank(l)
	return ok && r <= global.Load()
}

// Setup returns the function to run at exit (nothing to flush: writes are unbuffered).
func Setup() func() { return func() {} }

// Logr is the underlying logr.Logger (controller-runtime's logger); its V(n) is enabled up to
// the global level.
func Logr() logr.Logger { return logr.New(&levelSink{sink.GetSink()}) }

type levelSink struct{ logr.LogSink }

func (s *levelSink) Enabled(level int) bool { return int32(level) < global.Load() }
func (s *levelSink) WithValues(kv ...any) logr.LogSink {
	return &levelSink{s.LogSink.WithValues(kv...)}
}
func (s *levelSink) WithName(n string) logr.LogSink { return &levelSink{s.LogSink.WithName(n)} }

// Logger is the leveled logger the peer passes around.
type Logger interface {
	Error(msg string, err error, kv ...any)
	Warning(msg string, kv ...any)
	Info(msg string, kv ...any)
	Debug(msg string, kv ...any)
	Trace(msg string, kv ...any)
	All(msg string, kv ...any)
	WithValues(kv ...any) Logger
	WithName(name string) Logger
}

type logger struct{ l logr.Logger }

// New returns a logger writing at the global level.
func New() Logger { return logger{sink} }

func (g logger) at(l LogLevel, msg string, kv ...any) {
	if Enabled(l) {
		g.l.Info(msg, append(kv, "level", string(l))...)
	}
}
func (g logger) Error(msg string, err error, kv ...any) { g.l.Error(err, msg, kv...) }
func (g logger) Warning(msg string, kv ...any)          { g.at(LevelWarning, msg, kv...) }
func (g logger) Info(msg string, kv ...any)             { g.at(LevelInfo, msg, kv...) }
func (g logger) Debug(msg string, kv ...any)            { g.at(LevelDebug, msg, kv...) }
func (g logger) Trace(msg string, kv ...any)            { g.at(LevelTrace, msg, kv...) }
func (g logger) All(msg string, kv ...any)              { g.at(LevelAll, msg, kv...) }
func (g logger) WithValues(kv ...any) Logger            { return logger{g.l.WithValues(kv...)} }
func (g logger) WithName(name string) Logger            { return logger{g.l.WithName(name)} }

var root = New()

func Error(msg string, err error, kv ...any) { root.Error(msg, err, kv...) }
func Warning(msg string, kv ...any)          { root.Warning(msg, kv...) }
func Info(msg string, kv ...any)             { root.Info(msg, kv...) }
func Debug(msg string, kv ...any)            { root.Debug(msg, kv...) }

// Fatal logs err and exits 1.
func Fatal(err error, kv ...any) {
	root.Error("fatal", err, kv...)
	os.Exit(1)
}
