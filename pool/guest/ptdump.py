"""The kernel's page-table dump of the direct map: parse it into a DirectMap, write one back.

Input: debugfs ``page_tables/kernel`` (CONFIG_PTDUMP_DEBUGFS; arch/x86/mm/dump_pagetables.c).
Only the ``---[ Low Kernel Mapping ]---`` section is read: the lines after that header, up to
the next ``---[`` header (a file with no header at all is read whole, as an excerpt of that
section). Each line is one run of page-table entries of one level with identical flags, as the
kernel's ``note_page()`` prints it::

    0xff30c23180200000-0xff30c23199a00000         408M     RW         PSE     GLB NX pmd
    0xff30c2323ffe0000-0xff30c23280000000     1048704K                               pte

``0x%016lx-0x%016lx``, three spaces, the size as ``%9lu`` with the largest unit of B K M G T P E
that divides it exactly, a space, the flags, the level (pgd, p4d, pud, pmd, pte). A line with
no flags is a run of non-present entries: a hole (no RAM mapped there).

Meaning (x86-64, 4 KiB pages): a present ``pud`` line (flags include PSE) is a run of 1 GiB
leaves, a present ``pmd`` line (PSE) a run of 2 MiB leaves, a present ``pte`` line a run of
4 KiB pages. The first line starts at PAGE_OFFSET (randomized by KASLR, always 1 GiB aligned):
physical address = virtual address - PAGE_OFFSET. RAM is what is mapped; holes, and the end of
RAM, are taken from the dump (trailing holes up to the vmalloc area are dropped).

Checked, with a ValueError naming the line number and the problem: each line well formed;
the section non-empty; ranges ascending and contiguous (each line starts where the previous
one ended); the size field equal to end - start; start and size aligned to the level's entry
size (pte 4 KiB, pmd 2 MiB, pud 1 GiB, p4d and pgd 512 GiB); flags among the kernel's
(USR RW ro PWT PCD PSE PAT GLB NX x) and the model's SHARED, with exactly one of RW/ro and
one of NX/x on a present line; PSE on present pud and pmd lines and never on pte lines (the
kernel prints bit 7 as PSE only above pte level); no present p4d or pgd line (x86-64 has no
leaves above pud).

What the model keeps and drops. The model's only per-page attribute is the encryption state.
The dump does not print it: the TDX shared bit and the SEV C-bit are high address bits that
printk_prot() does not show (they are among the bits note_page() compares, so on a CoCo
guest a change of encryption state starts a new line with the same printed flags: see
:meth:`Ptdump.unprinted_breaks`). Every imported page is therefore private, unless its line
carries the token SHARED, which Linux never prints: it is this model's extension, written by
:func:`format_ptdump` for shared leaves so that a model with conversions re-imports
unchanged. RW/ro, x/NX, GLB, USR, PWT, PCD, PAT are recorded on each :class:`PtdumpLine`
(see :meth:`Ptdump.flag_bytes`) and dropped by the model; an export writes every present run
as ``RW GLB NX`` (the kernel's PAGE_KERNEL), so an exported dump re-imports to the same leaves
but not byte for byte the same text as a real one.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import attrs

from pool.guest.directmap import PRIVATE, SHARED, DirectMap, Leaf
from pool.guest.units import PAGE_SHIFT, PAGE_SIZE, GiB, KiB, MiB

__all__ = [
    "DEFAULT_PAGE_OFFSET",
    "LEVELS",
    "Ptdump",
    "PtdumpLine",
    "format_ptdump",
    "format_size_field",
    "parse_ptdump",
]

LEVELS = ("pgd", "p4d", "pud", "pmd", "pte")
DEFAULT_PAGE_OFFSET = 0xFFFF888000000000
"""x86-64 PAGE_OFFSET with 4-level paging and no KASLR (__PAGE_OFFSET_BASE_L4)."""

SECTION = "Low Kernel Mapping"
_LEVEL_BYTES = {"pte": PAGE_SIZE, "pmd": 2 * MiB, "pud": GiB, "p4d": 512 * GiB, "pgd": 512 * GiB}
_LEAF_SIZE = {"pte": "4k", "pmd": "2M", "pud": "1G"}
_KERNEL_FLAGS = ("USR", "RW", "ro", "PWT", "PCD", "PSE", "PAT", "GLB", "NX", "x")
_MODEL_FLAG = "SHARED"
_FLAGS = frozenset((*_KERNEL_FLAGS, _MODEL_FLAG))
_UNITS = "BKMGTPE"
_ENTRY = re.compile(
    r"^0x(?P<start>[0-9a-fA-F]+)-0x(?P<end>[0-9a-fA-F]+)\s+"
    r"(?P<size>\d+)(?P<unit>[BKMGTPE])(?:\s+(?P<rest>.*?))?\s*$"
)
_HEADER = re.compile(r"^---\[\s*(?P<name>.*?)\s*\]---\s*$")


@attrs.frozen
class PtdumpLine:
    """One line of the dump: a run of entries of one level with identical flags."""

    lineno: int  # 1-based, in the input text
    start: int  # virtual address
    end: int  # virtual address, exclusive
    level: str  # pgd, p4d, pud, pmd or pte
    flags: tuple[str, ...]  # empty: not present (a hole)

    @property
    def present(self) -> bool:
        return bool(self.flags)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@attrs.frozen
class Ptdump:
    """A parsed Low Kernel Mapping section."""

    page_offset: int  # the first line's start: PAGE_OFFSET
    lines: tuple[PtdumpLine, ...]  # present lines and holes, trailing holes excluded

    @property
    def end_pfn(self) -> int:
        """One past the last mapped page."""
        return (self.lines[-1].end - self.page_offset) >> PAGE_SHIFT

    def leaves(self) -> list[Leaf]:
        """The present lines as direct-map leaf runs (physical pfns), ascending."""
        out = []
        for line in self.lines:
            if line.present:
                out.append(
                    Leaf(
                        (line.start - self.page_offset) >> PAGE_SHIFT,
                        line.nbytes >> PAGE_SHIFT,
                        _LEAF_SIZE[line.level],
                        SHARED if _MODEL_FLAG in line.flags else PRIVATE,
                    )
                )
        return out

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Mapped memory as merged [start, end) pfn ranges."""
        out: list[tuple[int, int]] = []
        for leaf in self.leaves():
            end = leaf.start_pfn + leaf.npages
            if out and out[-1][1] == leaf.start_pfn:
                out[-1] = (out[-1][0], end)
            else:
                out.append((leaf.start_pfn, end))
        return out

    def holes(self) -> list[tuple[int, int]]:
        """Unmapped [start, end) pfn ranges below end_pfn."""
        ram = self.ram_ranges()
        inner = [(a, b) for (_, a), (b, _) in itertools.pairwise(ram)]
        return ([(0, ram[0][0])] if ram[0][0] else []) + inner

    def bytes_by_size(self) -> dict[str, int]:
        """The sums of the present lines by leaf size: what /proc/meminfo's DirectMap4k,
        DirectMap2M and DirectMap1G show, in bytes."""
        sizes = {"4k": 0, "2M": 0, "1G": 0}
        for line in self.lines:
            if line.present:
                sizes[_LEAF_SIZE[line.level]] += line.nbytes
        return sizes

    def flag_bytes(self) -> dict[str, int]:
        """Bytes mapped with each flag (present lines): what the model drops (RW/ro, x/NX,
        GLB, ...) summed, for reports."""
        counts: Counter[str] = Counter()
        for line in self.lines:
            for flag in line.flags:
                counts[flag] += line.nbytes
        return dict(sorted(counts.items()))

    def unprinted_breaks(self) -> list[int]:
        """Line numbers of present lines that follow a present line of the same level with the
        same printed flags. The kernel only starts a new line when something it compares
        changes; here that is a bit it does not print: on a CoCo guest, most likely the
        encryption bit (TDX shared bit, SEV C-bit: both are outside the pfn mask, so among
        the compared flags), e.g. around buffers decrypted at boot. Which side is shared
        cannot be told from the text: the import keeps both private."""
        out = []
        for a, b in itertools.pairwise(self.lines):
            if a.present and b.present and a.level == b.level and a.flags == b.flags:
                out.append(b.lineno)
        return out

    def direct_map(self) -> DirectMap:
        """A DirectMap with exactly these leaves (DirectMap.from_leaves): the dump's layout
        is the boot state, no split counted."""
        return DirectMap.from_leaves(self.end_pfn, self.leaves())


def _fail(lineno: int, problem: str, line: str) -> ValueError:
    return ValueError(f"ptdump line {lineno}: {problem}: {line.strip()!r}")


def _section(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the Low Kernel Mapping section's entry lines."""
    lines = text.splitlines()
    headers = [(i, m.group("name")) for i, line in enumerate(lines) if (m := _HEADER.match(line))]
    if not headers:
        return list(enumerate(lines, start=1))
    names = [name for _, name in headers]
    if SECTION not in names:
        raise ValueError(
            f"ptdump: no '---[ {SECTION} ]---' section (sections found: {', '.join(names)})"
        )
    k = names.index(SECTION)
    first = headers[k][0] + 1
    last = headers[k + 1][0] if k + 1 < len(headers) else len(lines)
    return [(i + 1, lines[i]) for i in range(first, last)]


def _parse_line(lineno: int, line: str) -> PtdumpLine:
    m = _ENTRY.match(line.strip())
    if not m:
        raise _fail(lineno, "not a page-table dump line ('0xSTART-0xEND  SIZE  flags level')", line)
    start, end = int(m.group("start"), 16), int(m.group("end"), 16)
    size = int(m.group("size")) << (10 * _UNITS.index(m.group("unit")))
    tokens = (m.group("rest") or "").split()
    if not tokens:
        raise _fail(lineno, "no level (pgd, p4d, pud, pmd or pte) at the end of the line", line)
    level, flags = tokens[-1], tuple(tokens[:-1])
    if level not in LEVELS:
        raise _fail(lineno, f"unknown level {level!r} (expected one of {', '.join(LEVELS)})", line)
    if end <= start:
        raise _fail(lineno, "end address not above start address", line)
    if size != end - start:
        raise _fail(
            lineno,
            f"size field {m.group('size')}{m.group('unit')} = {size} bytes "
            f"but end - start = {end - start} bytes",
            line,
        )
    unknown = [f for f in flags if f not in _FLAGS]
    if unknown:
        raise _fail(lineno, f"unknown flag {unknown[0]!r}", line)
    if len(set(flags)) != len(flags):
        raise _fail(lineno, "a flag appears twice", line)
    if flags and level in ("pgd", "p4d"):
        raise _fail(lineno, f"x86-64 has no leaves at {level} level (pud and below)", line)
    granule = _LEVEL_BYTES[level]
    if start % granule or size % granule:
        raise _fail(
            lineno,
            f"a {level} run must start and end on a {_human(granule)} boundary",
            line,
        )
    if flags:
        if ("RW" in flags) == ("ro" in flags):
            raise _fail(lineno, "a present entry shows exactly one of RW and ro", line)
        if ("NX" in flags) == ("x" in flags):
            raise _fail(lineno, "a present entry shows exactly one of NX and x", line)
        if level in ("pud", "pmd") and "PSE" not in flags:
            raise _fail(lineno, f"a present {level} line is a leaf and must show PSE", line)
        if level == "pte" and "PSE" in flags:
            raise _fail(lineno, "pte entries never show PSE (bit 7 is PAT at pte level)", line)
    return PtdumpLine(lineno, start, end, level, flags)


def parse_ptdump(text: str) -> Ptdump:
    """Parse the Low Kernel Mapping section (see the module docstring for the format and
    every check). Raises ValueError naming the line number and the problem."""
    lines: list[PtdumpLine] = []
    raw: dict[int, str] = {}
    for lineno, line in _section(text):
        if not line.strip():
            continue
        entry = _parse_line(lineno, line)
        if lines and entry.start != lines[-1].end:
            raise _fail(
                lineno,
                f"not contiguous: starts at {entry.start:#x}, the previous line "
                f"(line {lines[-1].lineno}) ended at {lines[-1].end:#x}",
                line,
            )
        lines.append(entry)
        raw[lineno] = line
    if not lines:
        raise ValueError(f"ptdump: the {SECTION} section has no entries")
    base = lines[0].start
    if base % GiB:
        raise _fail(
            lines[0].lineno,
            f"the first line must start at PAGE_OFFSET, which is 1 GiB aligned: {base:#x} is not",
            raw[lines[0].lineno],
        )
    while lines and not lines[-1].present:
        lines.pop()
    if not lines:
        raise ValueError(f"ptdump: the {SECTION} section maps no memory (only holes)")
    return Ptdump(base, tuple(lines))


# ---- writing --------------------------------------------------------------------------


def format_size_field(nbytes: int) -> str:
    """The kernel's size field: ``%9lu%c`` with the largest unit dividing the size exactly."""
    unit = 0
    while nbytes and not nbytes & 1023 and unit + 1 < len(_UNITS):
        nbytes >>= 10
        unit += 1
    return f"{nbytes:9d}{_UNITS[unit]}"


def _prot(level: str, present: bool, shared: bool) -> str:
    """printk_prot() for the direct map's PAGE_KERNEL flags (RW, GLB, NX; PSE on leaves above
    pte), or the blank field of a non-present run."""
    if not present:
        return " " * 30
    pse = "PSE " if level in ("pud", "pmd") else "    "
    return "    RW         " + pse + "    GLB NX " + ("SHARED " if shared else "")


def _entry(start: int, end: int, prot: str, level: str) -> str:
    return f"0x{start:016x}-0x{end:016x}   {format_size_field(end - start)} {prot}{level}\n"


def format_ptdump(
    direct_map: DirectMap,
    page_offset: int = DEFAULT_PAGE_OFFSET,
    mark_shared: bool = True,
) -> str:
    """The model's direct map as the kernel prints its Low Kernel Mapping section, between
    its header and the next one (``---[ vmalloc() Area ]---``). Present runs show the
    PAGE_KERNEL flags (RW GLB NX); holes below the end of RAM are one non-present line,
    printed at pte level as the kernel's dump of a real guest shows its PCI hole. Runs with
    the same level, flags and encryption state are one line, as the kernel merges them (on a
    CoCo guest the encryption bit is among the bits it compares, though it does not print
    it). Shared runs carry the model's SHARED token (not a kernel flag) unless mark_shared
    is False, in which case the text is what a CoCo guest's kernel would print and shared
    pages re-import as private (their lines show up in Ptdump.unprinted_breaks())."""
    if page_offset % GiB or page_offset < 0 or page_offset >= 1 << 64:
        raise ValueError(f"page_offset must be a 1 GiB-aligned 64-bit address: {page_offset:#x}")
    rows: list[tuple[int, int, str, str, int]] = []  # start_pfn, end_pfn, level, prot, attr

    def add(start: int, end: int, level: str, prot: str, attr: int) -> None:
        if rows and rows[-1][1] == start and rows[-1][2:] == (level, prot, attr):
            rows[-1] = (rows[-1][0], end, level, prot, attr)
        else:
            rows.append((start, end, level, prot, attr))

    previous_end = 0
    level_of = {"4k": "pte", "2M": "pmd", "1G": "pud"}
    for leaf in direct_map.leaves():
        if leaf.start_pfn > previous_end:
            add(previous_end, leaf.start_pfn, "pte", _prot("pte", False, False), -1)
        level = level_of[leaf.size]
        prot = _prot(level, True, mark_shared and leaf.attr == SHARED)
        add(leaf.start_pfn, leaf.start_pfn + leaf.npages, level, prot, leaf.attr)
        previous_end = leaf.start_pfn + leaf.npages
    if not rows:
        raise ValueError("the direct map maps nothing")
    out = [f"---[ {SECTION} ]---\n"]
    for start, end, level, prot, _ in rows:
        virtual = page_offset + (start << PAGE_SHIFT), page_offset + (end << PAGE_SHIFT)
        out.append(_entry(*virtual, prot, level))
    out.append("---[ vmalloc() Area ]---\n")
    return "".join(out)


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    return f"{nbytes} bytes"
