"""fastfork run's input: replacement strings, splitting items, command lines, quoting."""
import subprocess

import pytest

from fastfork._run_input import (Template, command_jobs, count_jobs, item_jobs, quote_argv,
                                 split_items)


# Expected values are what GNU parallel prints for these items.
@pytest.mark.parametrize("item, no_ext, base, dirname, base_no_ext", [
    (b"foo.tar.gz", b"foo.tar", b"foo.tar.gz", b".", b"foo.tar"),
    (b"dir.x/file", b"dir.x/file", b"file", b"dir.x", b"file"),
    (b"a/b/", b"a/b/", b"", b"a", b""),
    (b"/b", b"/b", b"b", b"/", b"b"),
    (b"a//b", b"a//b", b"b", b"a", b"b"),
    (b".bashrc", b"", b".bashrc", b".", b""),
    (b"x.y/", b"x.y/", b"", b".", b""),
    (b"", b"", b"", b".", b""),
    (b"/", b"/", b"", b"/", b""),
    (b"d/\xff\xfe.txt", b"d/\xff\xfe", b"\xff\xfe.txt", b"d", b"\xff\xfe"),
])
def test_replacement_strings_as_gnu_parallel(item, no_ext, base, dirname, base_no_ext):
    template = Template(["cmd", "{}", "{.}", "{/}", "{//}", "{/.}", "{#}", "{%}"])
    assert template.render(item, 7, 2) == [b"cmd", item, no_ext, base, dirname, base_no_ext,
                                           b"7", b"2"]


def test_several_replacements_in_one_argument_and_literal_text():
    template = Template(["convert", "{}", "out/{/.}-{#}.png"])
    assert template.render(b"in/a b.jpg", 3, 1) == [b"convert", b"in/a b.jpg",
                                                    b"out/a b-3.png"]


@pytest.mark.parametrize("arg", ["{1}", "{..}", "x{/..}", "{#.}", "{=s/a/b/=}", "{%%}"])
def test_unknown_replacement_string_is_an_error(arg):
    with pytest.raises(ValueError, match="unknown replacement string"):
        Template(["echo", arg])


@pytest.mark.parametrize("arg", ["{print $1}", "{a,b}", "{", "}", "{ }", "${HOME}"])
def test_other_braces_are_left_alone(arg):
    template = Template(["awk", arg])
    assert not template.has_replacements
    assert template.render(b"x", 1, 1) == [b"awk", arg.encode()]


def test_items_are_appended_without_a_replacement_string():
    jobs = item_jobs(Template(["gzip", "-9"]), [b"a.log", b"b c.log"])
    assert [j.command(1) for j in jobs] == [[b"gzip", b"-9", b"a.log"],
                                            [b"gzip", b"-9", b"b c.log"]]
    # Any replacement string, even one not naming the item, stops the append.
    jobs = item_jobs(Template(["echo", "{#}"]), [b"a", b"b"])
    assert [j.command(1) for j in jobs] == [[b"echo", b"1"], [b"echo", b"2"]]


def test_count_jobs_number_from_zero_and_append_nothing():
    jobs = count_jobs(Template(["echo", "run-{}", "{#}"]), 3)
    assert [j.command(1) for j in jobs] == [[b"echo", b"run-0", b"1"], [b"echo", b"run-1", b"2"],
                                            [b"echo", b"run-2", b"3"]]
    assert [j.command(1) for j in count_jobs(Template(["true"]), 2)] == [[b"true"], [b"true"]]


def test_split_items():
    assert split_items(b"", b"\n", "stdin") == []
    assert split_items(b"a\n\nb c\n", b"\n", "stdin") == [b"a", b"", b"b c"]
    assert split_items(b"a\nb", b"\n", "stdin") == [b"a", b"b"]
    assert split_items(b"a\nb\0c\n\0", b"\0", "stdin") == [b"a\nb", b"c\n"]
    with pytest.raises(ValueError, match="stdin line 2: a NUL byte"):
        split_items(b"a\nb\0c\n", b"\n", "stdin")


def test_command_lines_through_a_shell():
    lines = [b"echo a | tr a b", b"", b"  # comment", b"   ", b"exit 3"]
    jobs = command_jobs(lines, "/bin/sh", "stdin")
    assert [j.seq for j in jobs] == [1, 2]
    assert jobs[0].command(1) == [b"/bin/sh", b"-c", b"echo a | tr a b"]
    assert jobs[0].describe() == b"echo a | tr a b"
    multi = command_jobs([b"echo a\necho b"], "/bin/sh", "stdin")[0]
    assert multi.describe() == b"/bin/sh -c $'echo a\\necho b'"


def test_command_lines_split_without_a_shell():
    jobs = command_jobs([b"echo 'a  b' \"c\" \xff"], None, "stdin")
    assert jobs[0].command(1) == [b"echo", b"a  b", b"c", b"\xff"]
    with pytest.raises(ValueError, match=r"stdin line 3: No closing quotation"):
        command_jobs([b"true", b"# ok", b"echo 'open"], None, "stdin")


@pytest.mark.parametrize("argv", [
    [b"plain", b"with space", b"it's", b'"dq"', b"$HOME", b""],
    [b"new\nline", b"tab\there", b"cr\r", b"bell\x07", b"back\\slash'q"],
    [b"\xff\xfe", b"caf\xc3\xa9"],
])
def test_quote_argv_is_one_line_a_shell_splits_back(argv):
    line = quote_argv(argv)
    assert b"\n" not in line
    split = subprocess.run([b"bash", b"-c", b"printf '%s\\0' " + line], capture_output=True,
                           check=True, timeout=60).stdout
    assert split.split(b"\0")[:-1] == argv
