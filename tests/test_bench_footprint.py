"""The footprint benchmark's arithmetic: medians, ratios, goals, and which native libraries a process maps."""

from __future__ import annotations

from bench.footprint import Sample, native_packages, summarize

MAPS = """\
7f00-7f01 r-xp 00000000 08:01 1 /venv/lib/python3.11/site-packages/numpy/_core/_multiarray_umath.cpython-311.so
7f01-7f02 r-xp 00000000 08:01 2 /venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_.so
7f02-7f03 r--p 00000000 08:01 3 /venv/lib/python3.11/site-packages/aiohttp/_http_parser.cpython-311.so
7f03-7f04 r--p 00000000 08:01 4 /venv/lib/python3.11/site-packages/fastapi/__init__.py
7f04-7f05 rw-p 00000000 00:00 0
7f05-7f06 r-xp 00000000 08:01 5 /usr/lib/x86_64-linux-gnu/libc.so.6
"""


def sample(system: str, round_no: int, ready_s: float, rss: float, native: list[str]) -> Sample:
    return Sample(
        system=system,
        round=round_no,
        ready_s=ready_s,
        other_load_pct=0.0,
        rss_ready_mib=rss,
        rss_after_mib=rss + 1,
        peak_rss_mib=rss + 2,
        errors=0,
        escalated=None,
        native_packages=native,
    )


def test_native_packages_reads_site_packages_libraries_only() -> None:
    assert native_packages(MAPS) == ["aiohttp", "numpy"]


def test_summary_takes_medians_per_system_and_judges_the_goals_on_the_gateway() -> None:
    samples = [
        sample("gateway", 1, 1.0, 80.0, ["numpy", "aiohttp"]),
        sample("gateway", 2, 2.0, 90.0, ["aiohttp"]),
        sample("gateway", 3, 1.2, 85.0, ["aiohttp"]),
        *(sample("passthrough", r, 0.6, 60.0, ["aiohttp"]) for r in (1, 2, 3)),
    ]
    summary = summarize(samples)
    assert summary["medians"]["gateway"] == {
        "ready_s": 1.2,
        "rss_ready_mib": 85.0,
        "rss_after_mib": 86.0,
        "peak_rss_mib": 87.0,
    }
    assert summary["ratios"]["ready_s"] == 2.0
    assert summary["native_only_in_gateway"] == ["numpy"]
    assert [g["passed"] for g in summary["goals"]] == [True, True]  # 86 MiB ≤ 120, 1.2 s ≤ 1.5
    slow = summarize([*samples, *(sample("gateway", r, 3.0, 200.0, []) for r in (4, 5, 6))])
    assert [g["passed"] for g in slow["goals"]] == [False, False] and not slow["all_goals_met"]
