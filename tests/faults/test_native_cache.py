"""Fault injection for the native kernels' build cache (crossent/backends/native/__init__.py): damaged,
truncated, foreign-owned, group/world-writable and symbol-less cache files, no home directory, no
compiler, a read-only cache, and several processes building into one empty cache at once.

Each scenario runs in a process of its own with its own ``CROSSENT_CACHE_DIR``, so the library
this test process loaded is not disturbed: a child forked from one server process per module that
has imported torch and crossent but never touched the native kernels (``SERVER``), so that a
scenario costs a fork rather than an interpreter importing torch. What a scenario must show: the
process exits 0, a loss call agrees with ``torch.nn.functional.cross_entropy``, exactly the
warnings expected (one, or none), and a library another user could have written is never loaded
(its constructor would write a marker file).

To keep the suite fast, ``$CC`` is a stand-in compiler that copies a library compiled once per
module (at -O0, about 0.3 s): the cache logic sees a normal build, in milliseconds.

Running as root (CI): permission bits do not stop root, so the read-only and no-home scenarios
drop to a uid without a passwd entry (``OTHER_UID``) inside the child, after torch is
imported; foreign ownership is made with ``os.chown``. Not as root, those take their
unprivileged form (``chmod 0o500`` works as is; ``Path.home`` is made to fail as it does for such
a uid), and the ``chown`` cases are skipped.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

from crossent.backends import native

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
OTHER_UID = 12345  # no passwd entry: Path.home() fails for it once $HOME is gone
REAL_CC = next((shutil.which(n) for n in ("cc", "gcc", "clang") if shutil.which(n)), None)
KERNELS_C = Path(native.__file__).with_name("_kernels.c")

pytestmark = pytest.mark.skipif(
    os.name != "posix" or REAL_CC is None, reason="the native kernels need a POSIX system with a C compiler"
)

FAKE_CC = """#!/bin/sh
# Stands in for the C compiler: "builds" by copying a library the test compiled once.
out=""
while [ "$#" -gt 0 ]; do
  if [ "$1" = "-o" ]; then out="$2"; shift; fi
  shift
done
if [ -n "$FAKE_CC_DELAY" ]; then sleep "$FAKE_CC_DELAY"; fi
exec cp "{raw}" "$out"
"""

# A valid shared library without the kernels' symbols, whose constructor leaves a marker: what an
# attacker would plant under the predictable name, or what a stale or foreign build looks like.
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("CROSSENT_TEST_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("the planted library's constructor ran\n", f); fclose(f); }
}
int not_a_kernel(void) { return 0; }
"""

# The scenarios' server: torch is imported (and the torch-op path warmed) once, while still
# privileged; then each scenario runs in a child forked from it, which takes the scenario's
# environment, drops the uid and $HOME if asked, and makes the first native call.
SERVER = r"""
import faulthandler, json, os, sys, tempfile, traceback, warnings
import torch

torch.set_num_threads(1)  # no OpenMP team in the server: a forked child could not use one
import crossent
from crossent._options import SoftmaxOptions
from crossent.backends import native

x = torch.randn(5, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
y = torch.tensor([0, 3, 10, -100, 7])
with native.disabled():
    crossent.cross_entropy(x, y)
xr = x.clone().requires_grad_(True)
ref = torch.nn.functional.cross_entropy(xr, y, label_smoothing=0.1)
ref.backward()


def scenario(out):
    uid = int(os.environ.pop("TEST_SETUID", "0"))
    if uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if os.environ.pop("TEST_NO_HOME", ""):
        os.environ.pop("HOME", None)
        if not uid:  # as for a uid without a passwd entry
            import pathlib

            def _no_home(cls):
                raise RuntimeError("Could not determine home directory.")

            pathlib.Path.home = classmethod(_no_home)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = native.available()
        used = available and native.supports_softmax(x, y, SoftmaxOptions(label_smoothing=0.1))
        xg = x.clone().requires_grad_(True)
        loss = crossent.cross_entropy(xg, y, label_smoothing=0.1)
        loss.backward()
    json.dump({
        "native": bool(used), "loss_err": abs(float(loss) - float(ref)),
        "grad_err": float((xg.grad - xr.grad).abs().max()),
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("crossent")],
    }, out)


for line in sys.stdin:  # one request a line: the environment and the result file of a scenario
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.environ.clear()
            os.environ.update(request["env"])
            tempfile.tempdir = None  # $TMPDIR as the scenario sets it
            faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where, before the client's 180 s
            with open(request["out"], "w") as out:  # opened before the uid is dropped
                scenario(out)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Server:
    """The process running :data:`SERVER`; :meth:`run` runs one scenario in a child of it."""

    def __init__(self, folder: Path) -> None:
        self.errors = folder / "server-stderr.txt"
        env = {**os.environ, "CROSSENT_NATIVE": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        with open(self.errors, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)

    def run(self, env: dict[str, str], out: Path) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        start = self.errors.stat().st_size
        self.proc.stdin.write(json.dumps({"env": env, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 180)
        status = self.proc.stdout.readline().strip() if ready else "timed out"
        with open(self.errors) as f:
            f.seek(start)
            errors = f.read()
        assert status == "0", f"exit status {status}\n{errors[-4000:]}"
        return json.loads(out.read_text())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass(frozen=True)
class Kit:
    cc: Path  # the stand-in compiler
    name: str  # the cached library's file name for $CC = cc
    built: bytes  # what a build through cc leaves in the cache
    planted: bytes  # PLANTED_C compiled: a valid ELF without the kernels' symbols


@pytest.fixture(scope="module")
def kit() -> Iterator[Kit]:
    tools = Path(tempfile.mkdtemp(prefix="crossent-faults-"))
    tools.chmod(0o755)  # the stand-in compiler runs as OTHER_UID too
    try:
        raw = tools / "kernels.so"
        subprocess.run([REAL_CC, "-O0", "-shared", "-fPIC", "-pthread", "-o", str(raw), str(KERNELS_C)],
                       check=True, capture_output=True, timeout=120)
        (tools / "planted.c").write_text(PLANTED_C)
        planted = tools / "planted.so"
        subprocess.run([REAL_CC, "-shared", "-fPIC", "-o", str(planted), str(tools / "planted.c")],
                       check=True, capture_output=True, timeout=120)
        cc = tools / "cc"
        cc.write_text(FAKE_CC.format(raw=raw))
        cc.chmod(0o755)
        probe = tools / "probe"
        with pytest.MonkeyPatch.context() as mp:  # one build in this process gives the file's name
            mp.setenv("CC", str(cc))
            mp.setenv("CROSSENT_CACHE_DIR", str(probe))
            native._load()
        [built] = probe.glob("kernels-*.so")
        yield Kit(cc=cc, name=built.name, built=built.read_bytes(), planted=planted.read_bytes())
    finally:
        shutil.rmtree(tools, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One :data:`SERVER` for the module: each scenario costs a fork, not an interpreter that
    imports torch."""
    srv = Server(tmp_path_factory.mktemp("server"))
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A scratch folder OTHER_UID can reach (pytest's own tmp folders are root's, mode 0o700)."""
    if not ROOT:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="crossent-faults-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _others_can_run_the_sources() -> bool:
    """Whether OTHER_UID can read the kernels' sources (a checkout under /root, say, it cannot)."""
    for d in KERNELS_C.parents:
        if not d.stat().st_mode & stat.S_IXOTH:
            return False
    return all(KERNELS_C.with_name(n).stat().st_mode & stat.S_IROTH for n in native._SOURCES)


CAN_DROP_UID = ROOT and _others_can_run_the_sources()


@dataclass
class Ctx:
    kit: Kit
    base: Path
    cache: Path
    env: dict[str, str | None] = field(default_factory=dict)
    uid: int = 0  # nonzero: the subprocess drops to this uid

    def plant(self, data: bytes, mode: int = 0o644, owner: int | None = None) -> Path:
        path = self.cache / self.kit.name
        path.write_bytes(data)
        path.chmod(mode)
        if owner is not None:
            os.chown(path, owner, owner)
        return path

    def own_dir(self, uid: int) -> Path:
        """A folder under base owned by ``uid``, mode 0o700."""
        path = self.base / f"home-{uid}"
        path.mkdir(mode=0o700, exist_ok=True)
        if ROOT:
            os.chown(path, uid, uid)
        return path


def _env(ctx: Ctx) -> dict[str, str]:
    env: dict[str, str | None] = {
        **os.environ, "CC": str(ctx.kit.cc), "CROSSENT_CACHE_DIR": str(ctx.cache), "CROSSENT_NATIVE": "1",
        "CROSSENT_TEST_MARKER": str(ctx.base / "marker"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(ctx.env)
    if ctx.uid:
        env["TEST_SETUID"] = str(ctx.uid)
    return {k: v for k, v in env.items() if v is not None}


def _run(ctx: Ctx, code: str) -> dict:
    """``code`` in a new interpreter with the scenario's environment; its last line, as JSON."""
    res = subprocess.run([sys.executable, "-c", code], env=_env(ctx), capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, f"exit status {res.returncode}\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def _listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --------------------------------------------------------------------------------------------
# the scenarios: each sets up the cache folder (and the environment) for one fault


def _corrupt(ctx: Ctx) -> None:  # bit rot: 16 bytes in the middle flipped
    data = bytearray(ctx.kit.built)
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    ctx.plant(bytes(data))


def _truncated_100(ctx: Ctx) -> None:
    ctx.plant(ctx.kit.built[:100])


def _truncated_half(ctx: Ctx) -> None:  # headers whole, segments past the end: SIGBUS if loaded
    ctx.plant(ctx.kit.built[: len(ctx.kit.built) // 2])


def _symbol_less(ctx: Ctx) -> None:
    ctx.plant(ctx.kit.planted)


def _symbol_less_sealed(ctx: Ctx) -> None:  # passes the checksum: dlopen, AttributeError, rebuild
    ctx.plant(native._seal(ctx.kit.planted))


def _writable_file(ctx: Ctx) -> None:
    ctx.plant(native._seal(ctx.kit.planted), mode=0o666)


def _writable_dir(ctx: Ctx) -> None:
    ctx.plant(native._seal(ctx.kit.planted))
    ctx.cache.chmod(0o777)


def _foreign_file(ctx: Ctx) -> None:
    ctx.plant(native._seal(ctx.kit.planted), owner=OTHER_UID)


def _foreign_dir(ctx: Ctx) -> None:
    ctx.plant(native._seal(ctx.kit.planted), owner=OTHER_UID)
    os.chown(ctx.cache, OTHER_UID, OTHER_UID)
    ctx.cache.chmod(0o755)


def _no_home(ctx: Ctx) -> None:
    ctx.cache.rmdir()
    ctx.uid = OTHER_UID if CAN_DROP_UID else 0
    uid = ctx.uid or os.geteuid()
    tmp = ctx.own_dir(uid)
    ctx.env.update(HOME=None, XDG_CACHE_HOME=None, CROSSENT_CACHE_DIR=None, TEST_NO_HOME="1", TMPDIR=str(tmp))
    ctx.cache = tmp / f"crossent-{uid}"  # where the kernels should be cached


def _no_compiler(ctx: Ctx) -> None:
    empty = ctx.base / "bin"
    empty.mkdir()
    ctx.env.update(CC="/nonexistent/cc", PATH=str(empty))


def _read_only(ctx: Ctx) -> None:
    if ROOT:  # root writes through mode bits: the build runs as OTHER_UID, whose folder this is
        if not CAN_DROP_UID:
            pytest.skip("root ignores a read-only mode, and OTHER_UID cannot read the sources here")
        os.chown(ctx.cache, OTHER_UID, OTHER_UID)
        ctx.uid = OTHER_UID
        ctx.env["TMPDIR"] = str(ctx.own_dir(OTHER_UID))
    ctx.cache.chmod(0o500)


class Case(NamedTuple):
    setup: Callable[[Ctx], None]
    warning: str | None  # a pattern the one warning must match; None: no warning at all
    native: bool  # whether the kernels run in the end (rebuilt, or built elsewhere)
    then: str  # the cache folder afterwards (below)
    planted_loads: bool = False  # the planted library passes the file checks and is dlopen-ed


REBUILT = "the bad file rebuilt over, under the same name"
UNTOUCHED = "the refused folder exactly as the test left it"
EMPTY = "nothing written to the cache folder"
CACHED_THERE = "a 0o700 cache under $TMPDIR holding the build"

FILE, DIR = r"cached kernel library \S+/kernels-\w+\.so", r"kernel cache \S+"
root_only = pytest.mark.skipif(not ROOT, reason="making a file another user's takes root")
CASES = {
    "corrupt": Case(_corrupt, rf"{FILE} is damaged \(checksum mismatch\): not loaded, rebuilt", True,
                    REBUILT),
    "truncated-100-bytes": Case(_truncated_100, rf"{FILE} is truncated", True, REBUILT),
    "truncated-half": Case(_truncated_half, rf"{FILE} is truncated", True, REBUILT),
    "symbol-less-elf": Case(_symbol_less, rf"{FILE} is truncated or not a crossent build", True, REBUILT),
    "symbol-less-elf-with-checksum": Case(_symbol_less_sealed, rf"{FILE} lacks the kernels' symbols", True,
                                          REBUILT, planted_loads=True),
    "world-writable-file": Case(_writable_file, rf"{FILE} is writable by group or others \(mode 666\)", True,
                                REBUILT),
    "world-writable-dir": Case(_writable_dir, rf"{DIR} is writable by group or others \(mode 777\).*private",
                               True, UNTOUCHED),
    "foreign-owned-file": Case(_foreign_file, rf"{FILE} is owned by uid {OTHER_UID}", True, REBUILT),
    "foreign-owned-dir": Case(_foreign_dir, rf"{DIR} is owned by uid {OTHER_UID}.*private", True, UNTOUCHED),
    "no-home": Case(_no_home, None, True, CACHED_THERE),
    "no-compiler": Case(_no_compiler, r"unavailable \(no C compiler", False, EMPTY),
    "read-only-dir": Case(_read_only, rf"{DIR} is not writable .*private", True, EMPTY),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=k, marks=[root_only] if k.startswith("foreign") else []) for k, c in CASES.items()],
)
def test_cache_faults(kit: Kit, server: Server, base: Path, case: Case) -> None:
    cache = base / "cache"
    cache.mkdir(mode=0o700)
    ctx = Ctx(kit=kit, base=base, cache=cache)
    case.setup(ctx)
    before = _listing(ctx.cache) if case.then == UNTOUCHED else None

    out = server.run(_env(ctx), base / "result.json")

    assert out["loss_err"] < 1e-12 and out["grad_err"] < 1e-12, out  # fp64 on both paths
    assert out["native"] is case.native, out
    if case.warning is None:
        assert out["warnings"] == []
    else:
        assert len(out["warnings"]) == 1, out["warnings"]
        assert re.search(case.warning, out["warnings"][0]), out["warnings"]
    if not case.planted_loads:
        assert not (base / "marker").exists(), "a library that failed the checks was loaded"
    else:  # our own file, sealed: loaded, found without the kernels, then rebuilt
        assert (base / "marker").exists()
    if case.then == REBUILT:
        assert _listing(ctx.cache) == {kit.name: kit.built}
        assert stat.S_IMODE((ctx.cache / kit.name).stat().st_mode) == 0o644
    elif case.then == UNTOUCHED:
        assert _listing(ctx.cache) == before
    elif case.then == EMPTY:
        assert not ctx.cache.exists() or _listing(ctx.cache) == {}
    else:
        assert case.then == CACHED_THERE
        assert stat.S_IMODE(ctx.cache.stat().st_mode) == 0o700
        assert _listing(ctx.cache) == {kit.name: kit.built}


RACE = r"""
import os, sys, warnings
import torch, crossent
from crossent.backends import native

x, y = torch.randn(5, 11, dtype=torch.float64), torch.tensor([0, 3, 10, -100, 7])
ref = float(torch.nn.functional.cross_entropy(x, y))
r, w = os.pipe()
kids = []
for _ in range(int(os.environ["RACERS"])):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # blocks until the parent closes its end: all start together
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = native.available() and abs(float(crossent.cross_entropy(x, y)) - ref) < 1e-12
        msgs = [str(m.message) for m in caught if str(m.message).startswith("crossent")]
        if msgs or not ok:
            print(ok, msgs, file=sys.stderr)
        os._exit(0 if ok and not msgs else 1)
    kids.append(pid)
os.close(r)
os.close(w)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
print('{"codes": %s}' % codes)
"""


def test_concurrent_first_builds_into_one_empty_cache(kit: Kit, base: Path) -> None:
    """Six processes find the cache empty at once and each builds (the stand-in compiler holds
    each build for a second, so they overlap): all load a working library, none warns, and the
    cache ends with one whole, sealed file and no temporary files."""
    cache = base / "cache"
    ctx = Ctx(kit=kit, base=base, cache=cache, env={"RACERS": "6", "FAKE_CC_DELAY": "1"})
    out = _run(ctx, RACE)
    assert out["codes"] == [0] * 6
    assert _listing(cache) == {kit.name: kit.built}
    assert native._seal_problem(kit.built) is None
