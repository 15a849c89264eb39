"""Check the `az` commands of markdown shell blocks against azure-cli's own command table.

Run through scripts/check-guide-az, which installs the pinned azure-cli into a venv first.

For each `az ...` command in a fenced sh/bash/shell/zsh block (and `$ ` lines of console
blocks) this loads the command the way `az` itself does before parsing (the command loader's
load_command_table and load_arguments, the invoker's events that add --ids and the global
arguments, then the parser's subparser for that command) and checks, without logging in or
calling Azure:
  - the command path exists (and is not removed; deprecated ones are warned about),
  - every option is one the command's parser knows (aliases included, abbreviations refused),
    with the number of values it takes,
  - positional words only where the command has positionals,
  - literal values of options with fixed choices (e.g. -o tsv) are among them,
  - every required argument is there (for resource commands: the names, or --ids).
Global arguments (--query, -o/--output, --only-show-errors, --debug, --verbose, -h/--help) are
valid everywhere because az's parser gives every command them (through its parent parser), so
they are found among the command's options. --subscription is not global: az adds it only to
commands that use a subscription, and rejects it elsewhere (`az account list --subscription x`:
"unrecognized arguments"), so it is checked per command like any option.

Not checked: what az's validators check after parsing (option combinations, value formats),
values held in variables or command substitutions, extension commands (reported as unknown),
`az` in prose or inline code, and commands in comments. Abbreviated options are refused though
argparse would accept them: the guide spells options out.

Blocks are read as a shell reads them, as far as the guide needs: quotes, `\\` continuations,
comments, several commands per line (`;`, `&&`, `||`, `|`), `VAR=$(az ...)` and nested
`$(...)`/backticks (each substitution's commands are checked too, at their own line),
redirections, heredoc bodies (only their substitutions, and only where the delimiter is
unquoted, as the shell expands them).

Prints `file:line: az <command>: OK` or the problems, one line per command; exits 1 on any
problem, 2 on a usage error.
"""

import difflib
import os
import re
import sys
from dataclasses import dataclass, field

SHELL_LANGS = {"sh", "bash", "shell", "zsh"}
CONSOLE_LANGS = {"console", "shell-session"}

# Words that may stand before the command itself.
PREFIX_WORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "time", "sudo",
                "exec", "command", "env", "{"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SUBST = "$(…)"  # stands for a command substitution's output in a word


# ---------------------------------------------------------------- markdown


def shell_blocks(text):
    """Yield (line number of the block's first content line, content lines) for each fenced
    shell block; console blocks yield only their `$ ` command lines (and continuations)."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, start = [], i + 2
        i += 1
        while i < len(lines):
            closing = re.match(r"^\s*" + re.escape(fence[0]) + "{%d,}\\s*$" % len(fence), lines[i])
            if closing:
                break
            line = lines[i]
            # Content of a fence indented inside a list item loses that indent.
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        i += 1
        if lang in SHELL_LANGS:
            yield start, body
        elif lang in CONSOLE_LANGS:
            yield start, console_commands(body)


def console_commands(body):
    """Keep `$ ` prompt lines (prompt removed) and their `\\` continuations; blank the rest so
    line numbers stay right."""
    out, continuing = [], False
    for line in body:
        if continuing or line.startswith("$ "):
            out.append(line if continuing else line[2:])
            continuing = line.rstrip().endswith("\\")
        else:
            out.append("")
    return out


# ---------------------------------------------------------------- shell


@dataclass
class Word:
    text: str
    line: int
    quoted: bool = False  # had quotes or expansions: never an option, never a literal choice


@dataclass
class Command:
    words: list
    pos: int  # offset in the block: output follows the text's order


class ShellLexer:
    """Splits shell text into simple commands, as far as the guide's blocks need: quotes,
    backslash continuations, comments, `;` `&&` `||` `|` `&`, subshells, redirections and
    heredocs (bodies skipped), `$(...)` and backticks (their commands are commands too)."""

    def __init__(self, text, first_line):
        self.s = text
        self.i = 0
        self.first_line = first_line
        self.commands = []
        self.heredocs = []
        self.word_pos = {}

    def line_at(self, pos):
        return self.first_line + self.s.count("\n", 0, pos)

    def peek(self, n=0):
        j = self.i + n
        return self.s[j] if j < len(self.s) else ""

    def run(self):
        self.parse_list(end="")
        self.commands.sort(key=lambda c: c.pos)
        return self.commands

    def finish(self, words):
        if words:
            self.commands.append(Command(list(words), self.word_pos[id(words[0])]))
        words.clear()

    def parse_list(self, end):
        """Parse commands until `end` (")" or "`", consumed) or the end of the text."""
        words = []
        while self.i < len(self.s):
            c = self.peek()
            if end and c == end:
                self.i += 1
                self.finish(words)
                return
            if c in " \t":
                self.i += 1
            elif c == "\\" and self.peek(1) == "\n":
                self.i += 2
            elif c == "\n":
                self.i += 1
                self.finish(words)
                self.skip_heredocs()
            elif c == "#":
                while self.i < len(self.s) and self.peek() != "\n":
                    self.i += 1
            elif c in ";&|":
                self.i += 1
                self.finish(words)
            elif c == "(":
                self.i += 1
                self.finish(words)
                self.parse_list(end=")")
            elif c == ")":  # stray closer (e.g. a case pattern): a separator
                self.i += 1
                self.finish(words)
            elif c in "<>":
                self.redirection()
            else:
                w = self.parse_word(end)
                if w is None:
                    continue
                if re.fullmatch(r"\d+", w.text) and not w.quoted and self.peek() in "<>" and self.peek():
                    self.redirection()  # "2>&1": the digits are a file descriptor
                    continue
                words.append(w)
        self.finish(words)

    def redirection(self):
        op_start = self.i
        while self.peek() in "<>&|-" and self.peek() and self.i - op_start < 3:
            self.i += 1
        op = self.s[op_start:self.i]
        while self.peek() in " \t":
            self.i += 1
        target = self.parse_word("")
        if op.startswith("<<") and not op.startswith("<<<") and target is not None:
            self.heredocs.append((target.text, target.quoted))

    def skip_heredocs(self):
        """Step over the bodies of the heredocs begun on the line just ended. An unquoted
        delimiter's body expands `$(...)`, so its substitutions are commands too."""
        while self.heredocs:
            delim, literal = self.heredocs.pop(0)
            while self.i < len(self.s):
                nl = self.s.find("\n", self.i)
                nl = len(self.s) if nl < 0 else nl
                if self.s[self.i:nl].strip() == delim:
                    self.i = min(nl + 1, len(self.s))
                    break
                if literal:
                    self.i = min(nl + 1, len(self.s))
                    continue
                while self.i < len(self.s) and self.peek() != "\n":
                    if self.peek() == "\\":
                        self.i += 2
                    elif self.peek() in "$`":
                        self.expansion()
                    else:
                        self.i += 1
                self.i += 1

    def parse_word(self, end):
        start = self.i
        out, quoted = [], False
        while self.i < len(self.s):
            c = self.peek()
            if c in " \t\n;&|()<>" or (end and c == end):
                break
            if c == "\\":
                if self.peek(1) == "\n":
                    self.i += 2
                    continue
                out.append(self.peek(1))
                self.i += 2
                quoted = True
            elif c == "'":
                close = self.s.find("'", self.i + 1)
                close = len(self.s) if close < 0 else close
                out.append(self.s[self.i + 1:close])
                self.i = close + 1
                quoted = True
            elif c == '"':
                self.i += 1
                out.append(self.double_quoted())
                quoted = True
            elif c == "$" or c == "`":
                out.append(self.expansion())
                quoted = True
            else:
                out.append(c)
                self.i += 1
        if self.i == start:
            self.i += 1  # not a word start: step over it
            return None
        word = Word("".join(out), self.line_at(start), quoted)
        self.word_pos[id(word)] = start
        return word

    def double_quoted(self):
        out = []
        while self.i < len(self.s):
            c = self.peek()
            if c == '"':
                self.i += 1
                break
            if c == "\\" and self.peek(1) in '$`"\\\n':
                if self.peek(1) != "\n":
                    out.append(self.peek(1))
                self.i += 2
            elif c == "$" or c == "`":
                out.append(self.expansion())
            else:
                out.append(c)
                self.i += 1
        return "".join(out)

    def expansion(self):
        """At `$` or a backtick: parse a substitution's commands, or copy a parameter."""
        if self.peek() == "`":
            self.i += 1
            self.parse_list(end="`")
            return SUBST
        if self.s.startswith("$((", self.i):
            depth, self.i = 0, self.i + 1
            while self.i < len(self.s):
                ch = self.peek()
                self.i += 1
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    break
            return "$((…))"
        if self.s.startswith("$(", self.i):
            self.i += 2
            self.parse_list(end=")")
            return SUBST
        if self.s.startswith("${", self.i):
            close = self.s.find("}", self.i)
            close = len(self.s) - 1 if close < 0 else close
            text = self.s[self.i:close + 1]
            self.i = close + 1
            return text
        m = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-])?").match(self.s, self.i)
        self.i = m.end()
        return m.group(0)


def az_commands(words):
    """The arguments after `az` if this simple command runs az, else None."""
    k = 0
    while k < len(words) and (words[k].text in PREFIX_WORDS or ASSIGNMENT.match(words[k].text)):
        k += 1
    if k < len(words) and words[k].text == "az" and not words[k].quoted:
        return words[k + 1:]
    return None


def extract(path):
    with open(path, encoding="utf-8") as f:
        return extract_text(f.read())


def extract_text(text):
    """[(line, [Word, ...] after `az`)] for every az command of the markdown's shell blocks."""
    found = []
    for first_line, body in shell_blocks(text):
        for cmd in ShellLexer("\n".join(body), first_line).run():
            args = az_commands(cmd.words)
            if args is not None:
                az_word = next(w for w in cmd.words if w.text == "az")
                found.append((az_word.line, args))
    return found


# ---------------------------------------------------------------- azure-cli


@dataclass
class Spec:
    """What the parser of one command accepts."""
    name: str
    options: dict = field(default_factory=dict)  # option string -> argparse action
    positionals: list = field(default_factory=list)
    required: list = field(default_factory=list)  # actions argparse requires
    ids_required: list = field(default_factory=list)  # actions required unless --ids is given
    deprecation: str = ""


class AzureCli:
    """azure-cli's command loader and parser, used as `az` uses them before it parses."""

    def __init__(self):
        import azure.cli.core  # noqa: F401  (fail early with the import error)
        self.specs = {}
        self.resolved = {}

    def _new_invocation(self):
        from azure.cli.core import get_default_cli
        cli = get_default_cli()
        inv = cli.invocation_cls(cli_ctx=cli, parser_cls=cli.parser_cls,
                                 commands_loader_cls=cli.commands_loader_cls, help_cls=cli.help_cls)
        cli.invocation = inv
        return cli, inv

    def resolve(self, nouns):
        """(command name, number of nouns it names, loader state) for the leading words, or
        (None, what is wrong, None)."""
        key = tuple(n.lower() for n in nouns)
        if key not in self.resolved:
            self.resolved[key] = self._resolve(list(key))
        return self.resolved[key]

    def _resolve(self, lowered):
        for full in (False, True):
            # The command index makes this load only the modules of the first word, and those
            # load only the generated (aaz) commands the words select, as `az` does. When that
            # finds no command, load the modules' whole tables to be sure and to list choices.
            if full:
                os.environ["AZURE_AAZ_FULL_LOAD"] = "true"
            try:
                cli, inv = self._new_invocation()
                inv.commands_loader.load_command_table(list(lowered))
            finally:
                os.environ.pop("AZURE_AAZ_FULL_LOAD", None)
            table = dict(inv.commands_loader.command_table)
            for k in range(len(lowered), 0, -1):
                name = " ".join(lowered[:k])
                if name in table:
                    return name, k, (cli, inv, table)
        groups = {" ".join(n.split()[:j]) for n in table for j in range(1, len(n.split()))}
        prefix = []
        for k in range(len(lowered), 0, -1):
            if " ".join(lowered[:k]) in groups:
                prefix = lowered[:k]
                break
        here = " ".join(prefix)
        children = sorted({n.split()[len(prefix)] for n in table
                           if n.startswith(here + " " if here else "")})
        wanted = lowered[len(prefix)] if len(prefix) < len(lowered) else ""
        if not prefix:
            msg = "unknown command group 'az %s' (not in azure-cli core; an extension?)" % wanted
        elif wanted:
            close = difflib.get_close_matches(wanted, children, n=3)
            msg = "unknown command 'az %s %s'" % (here, wanted)
            msg += " (did you mean: %s?)" % ", ".join(close) if close else \
                " ('az %s' has: %s)" % (here, ", ".join(children))
        else:
            msg = "'az %s' is a command group, not a command (it has: %s)" % (here, ", ".join(children))
        return None, msg, None

    def spec(self, name, state):
        if name in self.specs:
            return self.specs[name]
        from knack import events as knack_events
        from azure.cli.core.commands import events as az_events
        cli, inv, table = state
        loader = inv.commands_loader
        inv.data["command_string"] = name
        loader.command_table = {name: table[name]}
        loader.command_name = name
        cli.raise_event(az_events.EVENT_INVOKER_PRE_LOAD_ARGUMENTS, commands_loader=loader)
        loader.load_arguments(name)
        cli.raise_event(az_events.EVENT_INVOKER_POST_LOAD_ARGUMENTS, commands_loader=loader)
        metadata = loader.command_table[name]
        required_before = {n for n, a in metadata.arguments.items() if a.type.settings.get("required")}
        # This event adds --ids and makes the resource-name arguments optional when it does.
        cli.raise_event(knack_events.EVENT_INVOKER_POST_CMD_TBL_CREATE, commands_loader=loader)
        inv.parser.cli_ctx = cli
        inv.parser.load_command_table(loader)
        spec = Spec(name)
        info = metadata.deprecate_info
        if info is not None:
            if info.expired():
                spec.deprecation = "removed: " + message_of(info)
            else:
                spec.deprecation = message_of(info)
        parser = inv.parser.subparser_map.get(name)
        if parser is None:
            spec.deprecation = spec.deprecation or "not in the parser (removed?)"
            self.specs[name] = spec
            return spec
        has_ids = False
        for action in parser._actions:
            for opt in action.option_strings:
                spec.options[opt] = action
            if not action.option_strings:
                spec.positionals.append(action)
            elif action.required:
                spec.required.append(action)
            has_ids = has_ids or "--ids" in action.option_strings
        if has_ids:
            for action in parser._actions:
                if action.dest in required_before and not action.required and action.option_strings:
                    spec.ids_required.append(action)
        self.specs[name] = spec
        return spec


def message_of(info):
    try:
        return str(info._get_message(info))  # knack's Deprecated/StatusTag
    except Exception:  # noqa: BLE001  (only for a message text)
        return "deprecated"


def nvalues(action):
    """(min, max) number of values an option takes; max None for unbounded."""
    n = action.nargs
    if n is None:
        return 1, 1
    if n == 0:
        return 0, 0
    if n == "?":
        return 0, 1
    if n == "*":
        return 0, None
    if n == "+":
        return 1, None
    if isinstance(n, int):
        return n, n
    return 1, None  # argparse.REMAINDER and the like


def label(action):
    long = [o for o in action.option_strings if o.startswith("--")]
    short = [o for o in action.option_strings if not o.startswith("--")]
    return "/".join(short[:1] + long[:1]) or action.dest


def looks_like_option(word):
    return not word.quoted and word.text.startswith("-") and len(word.text) > 1 \
        and not re.fullmatch(r"-\d+(\.\d+)?", word.text)


def check(az, args):
    """(command label, problems, warnings) for the words after `az`."""
    nouns = []
    for w in args:
        if looks_like_option(w) or w.quoted:
            break
        nouns.append(w.text)
    if not nouns:
        return "az", ["no command (only options)"], []
    name, used, state = az.resolve(nouns)
    if name is None:
        return "az " + " ".join(nouns), [used], []
    spec = az.spec(name, state)
    problems, warnings = [], []
    if spec.deprecation.startswith("removed") or not spec.options:
        return "az " + name, [spec.deprecation or "command has no parser"], []
    if spec.deprecation:
        warnings.append(spec.deprecation)

    options = spec.options
    seen = set()
    positionals = list(spec.positionals)
    rest = args[used:]
    i = 0
    while i < len(rest):
        w = rest[i]
        i += 1
        if w.text == "--" and not w.quoted:
            rest_positional = rest[i:]
            for extra in rest_positional:
                if not positionals:
                    problems.append("unexpected positional argument '%s'" % extra.text)
                else:
                    positionals.pop(0)
            break
        if not looks_like_option(w):
            if positionals:
                action = positionals[0]
                _, hi = nvalues(action)
                if hi is not None and hi <= 1:
                    positionals.pop(0)
                seen.add(id(action))
            else:
                problems.append("unexpected positional argument '%s'" % w.text)
            continue
        opt, eq, attached = w.text.partition("=")
        action = options.get(opt)
        if action is None and not opt.startswith("--") and len(opt) > 2 and opt[:2] in options:
            opt, eq, attached = opt[:2], "=", opt[2:]  # "-gNAME"
            action = options.get(opt)
        if action is None:
            longs = [o for o in options if o.startswith("--")]
            prefixed = [o for o in longs if o.startswith(opt)] if opt.startswith("--") else []
            if len(prefixed) == 1:
                problems.append("%s is an abbreviation of %s: write it in full" % (opt, prefixed[0]))
                action = options[prefixed[0]]
            else:
                close = difflib.get_close_matches(opt, list(options), n=2)
                hint = " (did you mean %s?)" % " or ".join(close) if close else ""
                if opt == "--subscription":
                    hint = " (this command takes no subscription; az rejects it)"
                problems.append("unknown option %s%s" % (opt, hint))
                # Skip what looks like its value so it is not reported as positional.
                while i < len(rest) and not looks_like_option(rest[i]):
                    i += 1
                continue
        lo, hi = nvalues(action)
        seen.add(id(action))
        # A deprecated alias is a str subclass carrying its deprecate_info (knack's parser).
        alias = next((o for o in action.option_strings if o == opt), None)
        dep = getattr(alias, "deprecate_info", None) or getattr(action, "deprecate_info", None)
        if dep is not None:
            warnings.append(message_of(dep))
        values = []
        if eq:
            values.append(Word(attached, w.line, w.quoted))
            if hi == 0:
                problems.append("%s takes no value" % opt)
        else:
            while (hi is None or len(values) < hi) and i < len(rest) and not looks_like_option(rest[i]):
                values.append(rest[i])
                i += 1
        if len(values) < lo:
            problems.append("%s needs %s" % (opt, "a value" if lo == 1 else "%d values" % lo))
        choices = action.choices
        if choices is not None:
            allowed = [str(c) for c in choices]
            for v in values:
                if not v.quoted and v.text.lower() not in [a.lower() for a in allowed]:
                    problems.append("%s %s: not one of %s" % (opt, v.text, ", ".join(allowed)))

    for action in spec.required:
        if id(action) not in seen:
            problems.append("missing required argument %s" % label(action))
    ids = spec.options.get("--ids")
    if spec.ids_required and (ids is None or id(ids) not in seen):
        for action in spec.ids_required:
            if id(action) not in seen:
                problems.append("missing required argument %s (or --ids)" % label(action))
    for action in positionals:
        lo, _ = nvalues(action)
        if lo > 0 and id(action) not in seen:
            problems.append("missing positional argument %s" % action.dest)
    return "az " + name, problems, warnings


def main(argv):
    files = argv[1:]
    if not files:
        print("usage: check_az.py FILE.md ...", file=sys.stderr)
        return 2
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        print("check_az: no such file: %s" % ", ".join(missing), file=sys.stderr)
        return 2
    from azure.cli.core import __version__ as version
    az = AzureCli()
    total = bad = 0
    for path in files:
        for line, args in extract(path):
            total += 1
            name, problems, warnings = check(az, args)
            verdict = "; ".join(problems) if problems else "OK"
            if warnings:
                verdict += " (warning: %s)" % "; ".join(dict.fromkeys(warnings))
            bad += bool(problems)
            print("%s:%d: %s: %s" % (path, line, name, verdict))
    print("azure-cli %s: %d az commands in %d files, %d with problems" % (version, total, len(files), bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
