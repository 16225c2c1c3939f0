"""`make wheel-test`: the install users get, tried as they use it.

Builds the sdist, then the wheel from that sdist (as a fresh machine with gcc and the Python
headers would: the compiled page-allocator core, pool.guest._core, is built there), or takes
--wheel FILE; checks that the sdist holds the extension's C source and that the wheel holds
every tracked data file of the packages and the compiled core; installs the wheel into a
fresh virtual environment in a temporary directory outside the repository, and from a
working directory outside the repository:

0. imports the installed package and checks that its page allocator runs on the compiled
   core (pool.guest.buddy.compiled_core(), backend "c"), loaded from the venv;
1. `sharedpoold --version`, `hv-netvsc-sim --version`, `python -m pool.guest --version`;
2. starts `sharedpoold` on a temporary Unix socket (metrics on 127.0.0.1:0) and waits for
   `/readyz`;
3. `hv-netvsc-sim run --cycles 1 --strict` against it, and in-process;
4. `python -m pool.guest demo` on a small guest;
5. checks that the daemon's journal writer process runs from the venv's package, then
   stops the daemon with SIGTERM and expects exit 0 and the writer gone with it.

Every step is bounded in time; the daemon is killed whatever happens. Exit 0 when all
pass, 1 with the failing step's output otherwise. Uses only the standard library, so it
runs with the system interpreter that creates the venv.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pool", "daemon", "hv_netvsc_sim")
BUILD_REQUIRES = ("setuptools>=77", "wheel")  # pyproject.toml's [build-system] requires
EXTENSION_SOURCES = ("pool/guest/_core.c",)
"""C sources of the compiled core: in the sdist; the wheel holds the module built from them."""
EXTENSION_MODULE = re.compile(r"^pool/guest/_core\.cpython-[^/]+\.so$")
CORE_CHECK = """
import pathlib, sys
import pool.guest._core as core
from pool.guest.buddy import PageAllocator, compiled_core
assert compiled_core() is core, "compiled_core() is not the installed extension"
a = PageAllocator(4096, [(0, 4096)], cpus=1)
assert a.backend == "c", a.backend
pfn = a.alloc(3, ("DMA",))
assert pfn is not None
a.free(pfn, 3)
a.check_invariants()
print(pathlib.Path(core.__file__).resolve())
"""
SMALL_GUEST = ["--guest-memory", "1GiB", "--age-steps", "2000"]


class Failed(Exception):
    pass


def step(title: str) -> None:
    print(f"wheel-test: {title}", flush=True)


def run(cmd: list[str], cwd: Path, timeout: float = 300, **kw: object) -> str:
    try:
        done = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired:
        raise Failed(f"{' '.join(cmd)}: no answer after {timeout:.0f} s") from None
    if done.returncode != 0:
        raise Failed(
            f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def tracked_data_files() -> list[str]:
    """Tracked files of the packages that are not Python sources: what the wheel must hold."""
    out = subprocess.run(
        ["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [
        f
        for f in out
        if not f.endswith((".py", ".pyc"))
        and Path(f).name != "README.md"
        and f not in EXTENSION_SOURCES
    ]


def missing_from(wheel: Path) -> list[str]:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in tracked_data_files() if f not in names]
    if not any(EXTENSION_MODULE.match(n) for n in names):
        missing.append("pool/guest/_core.cpython-*.so (the compiled core)")
    return missing


def build_sdist(python: str, out: Path) -> Path:
    """The sdist, by the project's build backend (setuptools' build_meta, as `python -m build
    --sdist` calls it), with the build requirements pip installs into a scratch directory."""
    out = out.resolve()
    tools = out / ".build-tools"
    run(
        [python, "-m", "pip", "install", "--quiet", "--target", str(tools), *BUILD_REQUIRES],
        ROOT,
        600,
    )
    env = {**os.environ, "PYTHONPATH": str(tools)}
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    run([python, "-c", code], ROOT, 300, env=env)
    shutil.rmtree(tools, ignore_errors=True)
    sdists = sorted(out.glob("sharedpool-*.tar.gz"))
    if not sdists:
        raise Failed(f"no sdist was built in {out}")
    with tarfile.open(sdists[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    lacking = [f for f in (*EXTENSION_SOURCES, "setup.py", "pyproject.toml") if f not in names]
    if lacking:
        raise Failed(f"the sdist lacks {', '.join(lacking)}")
    return sdists[-1]


def build_wheel(python: str, out: Path, from_sdist: bool = True) -> Path:
    """The wheel, built from the sdist (pip's isolated build: setuptools compiles the core),
    or straight from the tree (``from_sdist`` False: the quick check of the test suite)."""
    out = out.resolve()
    source = build_sdist(python, out) if from_sdist else ROOT
    run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)], out)
    wheels = sorted(out.glob("sharedpool-*.whl"))
    if not wheels:
        raise Failed(f"no wheel was built in {out}")
    return wheels[-1]


def wait_ready(proc: subprocess.Popen[str], log: Path, timeout: float = 120) -> str:
    """The metrics listener's URL once /readyz answers 200."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"sharedpoold exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if url is None:
            m = re.search(
                r"sharedpoold listening on .*metrics=tcp:(127\.0\.0\.1:\d+)", log.read_text()
            )
            url = f"http://{m.group(1)}" if m else None
        if url is not None:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return url
            except OSError:
                pass
        time.sleep(0.2)
    raise Failed(f"sharedpoold not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def journal_writers(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the daemon's journal writer processes (its children running
    daemon.journal_writer)."""
    out = []
    children = [
        c
        for t in Path(f"/proc/{pid}/task").iterdir()
        for c in t.joinpath("children").read_text().split()
    ]
    for child in children:  # each thread's: the writer is started from a worker thread
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "journal_writer" in cmdline:
            out.append((int(child), cmdline))
    return out


def check(wheel: Path, python: str, content_check: bool) -> None:
    if content_check:
        step(f"contents of {wheel.name}")
        missing = missing_from(wheel)
        if missing:
            raise Failed(f"the wheel lacks tracked package data: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="sharedpool-wheel-") as tmp_name:
        tmp = Path(tmp_name)
        if tmp.resolve().is_relative_to(ROOT):
            raise Failed(f"{tmp} is inside the repository")
        venv = tmp / "venv"
        step(f"fresh venv in {venv}")
        run([python, "-m", "venv", str(venv)], tmp)
        bin_ = venv / "bin"
        run([str(bin_ / "python"), "-m", "pip", "install", "--quiet", str(wheel)], tmp, 600)
        work = tmp / "work"  # an empty working directory outside the repository
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.pop("SHAREDPOOL_PURE_PYTHON", None)
        env["XDG_CACHE_HOME"] = str(tmp / "cache")  # the aged-guest cache: not the user's
        step("the page allocator runs on the compiled core of the installed wheel")
        where = Path(run([str(bin_ / "python"), "-c", CORE_CHECK], work, env=env).strip())
        if not where.is_relative_to(venv.resolve()):
            raise Failed(f"pool.guest._core was loaded from {where}, not from the venv")
        print(f"  {where}")
        step("--version of every command")
        for cmd in (
            [str(bin_ / "sharedpoold"), "--version"],
            [str(bin_ / "hv-netvsc-sim"), "--version"],
            [str(bin_ / "python"), "-m", "pool.guest", "--version"],
        ):
            print("  " + run(cmd, work, env=env).strip())
        step("sharedpoold until /readyz")
        sock = tmp / "run" / "sharedpoold.sock"
        log = tmp / "sharedpoold.log"
        with open(log, "w") as logf:
            proc = subprocess.Popen(
                [
                    str(bin_ / "sharedpoold"),
                    "--state-dir",
                    str(tmp / "state"),
                    "--listen",
                    f"unix:{sock}",
                    "--metrics-listen",
                    "tcp:127.0.0.1:0",
                    *SMALL_GUEST,
                    "--pool-max",
                    "512MiB",
                ],
                cwd=work,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        try:
            url = wait_ready(proc, log)
            step("hv-netvsc-sim run --cycles 1 --strict against the daemon")
            run(
                [
                    *(str(bin_ / "hv-netvsc-sim"), "run", "--cycles", "1", "--strict"),
                    *("--daemon", f"unix:{sock}"),
                ],
                work,
                env=env,
            )
            with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
                if b"sharedpool_allocations_total" not in answer.read():
                    raise Failed("/metrics lacks sharedpool_allocations_total")
            step("the page and its files from the installed package (daemon/static, palette)")
            for path, marker in (
                ("/", b'<div id="map"'),
                ("/ui/ui.js", b"/v1/memory-map"),
                ("/ui/ui.css", b"#map"),
                ("/ui/palette.json", b'"colours"'),
                ("/v1/memory-map", b'"region_bytes"'),
            ):
                with urllib.request.urlopen(url + path, timeout=5) as answer:
                    if marker not in answer.read():
                        raise Failed(f"{path} from the wheel lacks {marker!r}")
            step("the journal writer runs from the installed package, and stops with it")
            writers = journal_writers(proc.pid)
            if len(writers) != 1 or str(tmp / "venv") not in writers[0][1]:
                raise Failed(f"expected one journal writer from the venv, found {writers}")
            step("sharedpoold stops on SIGTERM with exit 0")
            proc.send_signal(signal.SIGTERM)
            if proc.wait(timeout=30) != 0:
                raise Failed(f"sharedpoold exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if Path(f"/proc/{writers[0][0]}").exists():
                raise Failed(f"the journal writer (pid {writers[0][0]}) outlived the daemon")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        step("hv-netvsc-sim run --cycles 1 --strict in-process")
        run(
            [str(bin_ / "hv-netvsc-sim"), "run", "--cycles", "1", "--strict", *SMALL_GUEST],
            work,
            env=env,
        )
        step("python -m pool.guest demo")
        out = run([str(bin_ / "python"), "-m", "pool.guest", "demo", *SMALL_GUEST], work, env=env)
        if "DirectMap" not in out:
            raise Failed(f"pool.guest demo printed no direct map:\n{out[-2000:]}")
        leftovers = [p.name for p in work.iterdir()]
        if leftovers:
            raise Failed(f"the commands wrote into the working directory: {leftovers}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="check this wheel instead of building one")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter that makes the venv (default: this)"
    )
    parser.add_argument(
        "--no-content-check",
        action="store_true",
        help="skip the wheel's file list check (to see what a user sees with a broken wheel)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="keep the built wheel in this directory (make wheel-test: dist/, which the "
        "container image installs); default: a temporary directory, removed",
    )
    parser.add_argument(
        "--contents-only",
        action="store_true",
        help="only build the wheel (from the tree, not the sdist) and check its file list "
        "(seconds; the test suite's check)",
    )
    args = parser.parse_args()
    t0 = time.monotonic()
    out = args.out or Path(tempfile.mkdtemp(prefix="sharedpool-dist-"))
    if args.out:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("sharedpool-*.whl"):
            old.unlink()  # only the wheel of this tree is left for the image
    try:
        wheel = args.wheel or build_wheel(args.python, out, from_sdist=not args.contents_only)
        if args.contents_only:
            missing = missing_from(wheel)
            if missing:
                raise Failed(f"the wheel lacks tracked package data: {', '.join(missing)}")
        else:
            check(wheel.resolve(), args.python, not args.no_content_check)
    except Failed as exc:
        print(f"wheel-test: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(f"wheel-test: passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
