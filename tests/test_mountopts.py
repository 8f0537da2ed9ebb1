"""cachefs/cli/options.py: the -o parser on its own (no mounts; milliseconds)."""

from __future__ import annotations

import pytest

from cachefs.errors import CachefsError
from cachefs.cli.options import (IGNORED, REFUSED, MountOptionError, MountOptions, check_submitter, merge,
                               parse_options)
from cachefs.policy import MODES


def one_line_error(*texts: str, sloppy: bool = False) -> str:
    with pytest.raises(MountOptionError) as info:
        parse_options(texts, sloppy=sloppy)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_nothing_given_is_all_defaults():
    assert parse_options([]) == MountOptions()
    assert parse_options(["", ",,"]) == MountOptions()


def test_every_option_of_ours():
    o = parse_options(["cache=none,aio=native", "ro,default_permissions",
                       "uid=1000,gid=100,umask=027,log=/var/log/c.log,pid_file=/run/c.pid",
                       "create_format=raw,debug"])
    assert o == MountOptions(cache="none", aio="native", read_only=True, default_permissions=True,
                             uid=1000, gid=100, umask=0o27, log="/var/log/c.log", pid_file="/run/c.pid",
                             create_format="raw", debug=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_cache_mode(mode):
    assert parse_options([f"cache={mode}"]).cache == mode


def test_later_value_wins_as_in_mount8():
    """mount(8) puts "rw" first and fstab options before `mount -o` ones."""
    assert parse_options(["rw,cache=none", "ro,cache=writeback"]) == MountOptions(cache="writeback", read_only=True)
    assert not parse_options(["ro", "rw"]).read_only


def test_allow_other_implies_default_permissions():
    assert parse_options(["allow_other"]).kernel_checks_modes
    assert parse_options(["default_permissions"]).kernel_checks_modes
    assert not parse_options(["rw"]).kernel_checks_modes


def test_user_and_group_names():
    o = parse_options(["uid=root,gid=root"])
    assert (o.uid, o.gid) == (0, 0)
    assert "uid=nosuchuser-cachefs" in one_line_error("uid=nosuchuser-cachefs")
    assert "no such group" in one_line_error("gid=nosuchgroup-cachefs")
    assert "uid=-1" in one_line_error("uid=-1")
    assert "4294967295" in one_line_error("uid=4294967295")


@pytest.mark.parametrize("text,mask", [("0", 0), ("022", 0o22), ("777", 0o777), ("0007", 0o7)])
def test_umask_is_octal(text, mask):
    assert parse_options([f"umask={text}"]).umask == mask


@pytest.mark.parametrize("text", ["8", "1000", "0x1f", "-1", "u=rwx"])
def test_bad_umask(text):
    assert f"umask={text}" in one_line_error(f"umask={text}")


@pytest.mark.parametrize("opt", ["cache=fast", "aio=posix", "create_format=vmdk"])
def test_bad_choice_names_option_and_choices(opt):
    msg = one_line_error(f"rw,{opt}")
    assert msg.startswith(f"-o {opt}:") and "choose one of" in msg


@pytest.mark.parametrize("opt", ["cache", "cache=", "log=", "uid"])
def test_value_option_needs_a_value(opt):
    assert "needs a value" in one_line_error(opt)


def test_switch_takes_no_value():
    assert "takes no value" in one_line_error("allow_other=1")


@pytest.mark.parametrize("opt", [*IGNORED, "x-systemd.requires=/srv", "x-mount.mkdir", "comment=systemd.automount",
                                 "user=alice"])
def test_helper_options_accepted_and_reported(opt):
    o = parse_options([f"rw,{opt},cache=none"])
    assert o == MountOptions(cache="none", ignored=o.ignored)
    assert [name for name, _ in o.ignored] == [opt]
    assert all(why for _, why in o.ignored)


@pytest.mark.parametrize("opt", sorted(REFUSED))
def test_kernel_flags_we_would_not_honour_are_refused(opt):
    msg = one_line_error(f"rw,{opt}")
    assert msg.startswith(f"-o {opt}: not supported")


@pytest.mark.parametrize("opt", ["fsname=x", "max_read=4096", "big_writes", "loop", "nonempty"])
def test_unknown_refused_in_one_line(opt):
    msg = one_line_error("rw", opt)
    assert msg.startswith(f"-o {opt}: unknown mount option") and "cache=" in msg


def test_sloppy_drops_only_the_unknown():
    o = parse_options(["rw,frobnicate,cache=none"], sloppy=True)
    assert o.cache == "none" and o.ignored[0][0] == "frobnicate" and "-s" in o.ignored[0][1]
    assert "not supported" in one_line_error("noatime", sloppy=True)
    assert "choose one of" in one_line_error("cache=fast", sloppy=True)


def test_flags_and_options_agree_or_are_refused():
    flags = MountOptions(cache="none", allow_other=True, log="/a")
    assert merge(flags, parse_options(["cache=none,debug"])) == MountOptions(
        cache="none", allow_other=True, log="/a", debug=True)
    assert merge(flags, MountOptions(aio="native")).aio == "native"
    assert merge(MountOptions(), parse_options(["ro"])).read_only
    with pytest.raises(MountOptionError, match=r"^--cache none and -o cache=writeback disagree"):
        merge(flags, parse_options(["cache=writeback"]))
    with pytest.raises(MountOptionError, match=r"^--pid-file /a and -o pid_file=/b disagree"):
        merge(MountOptions(pid_file="/a"), MountOptions(pid_file="/b"))


def test_native_aio_needs_a_direct_mode():
    for mode in ("none", "directsync", "auto"):
        check_submitter(mode, "native")
    for mode in ("writeback", "writethrough", "unsafe"):
        with pytest.raises(MountOptionError, match="needs O_DIRECT"):
            check_submitter(mode, "native")
    check_submitter("writeback", "io_uring")


def test_errors_are_cachefs_errors():
    """The CLI's one-line handler catches CachefsError."""
    assert issubclass(MountOptionError, CachefsError)


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        parse_options(["ro"]).read_only = False
