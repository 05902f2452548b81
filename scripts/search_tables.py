"""The tables of docs/search.md, rendered from `fmnist bench search`'s JSON.

    python scripts/search_tables.py bench/cpu/search.json

tests/test_search.py checks that docs/search.md holds exactly these lines.
"""

from __future__ import annotations

import json


def mb(b):
    return f"{b / 1e6:,.0f} MB" if b >= 1e6 else f"{b / 1e3:,.0f} kB"


def ms(x):
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def quality(q: dict) -> list[str]:
    rows = [("this embedding (penultimate features, 384 numbers)", q["embedding"]),
            ("raw pixels (784 numbers, L2)", q["baseline_pixels"]),
            (f"PCA of the pixels to {q['dim']} numbers (L2)", q["baseline_pca"])]
    out = [f"Fashion-MNIST: {q['queries']:,} test images as queries, {q['catalogue']:,} training images as the "
           f"catalogue, exact search. Relevant = same class.", "",
           "| embedding | precision@10 | mAP@100 |", "|---|---|---|"]
    out += [f"| {name} | {r['precision_at_10']:.4f} | {r['map_at_100']:.4f} |" for name, r in rows]
    s = q["same_item"]
    out += ["", f"The same item from a photo: {s['photos']:,} test images rendered as product photos "
                f"(`{s['renderer']}`), converted as `fmnist predict` converts them, against {s['catalogue']:,} "
                f"items (the training images and all test originals).", "",
            "| original found first | original in the top 10 | conversion p50 / p99 | embedding |",
            "|---|---|---|---|",
            f"| {s['top1']:.1%} | {s['top10']:.1%} | {s['conversion']['p50_ms']:.0f} / {s['conversion']['p99_ms']:.0f} ms "
            f"| {q['embedding_ms_per_image_batch128']:.2f} ms per image (batches of 128) |"]
    return out


def made_of(n: int, real: int, copies: str | None) -> str:
    """What a catalogue holds: the training images, and what the items past them are. Entries
    from before --copies existed hold moved copies."""
    if n <= real:
        return f"{n:,} training images"
    return f"{real:,} training images + {n - real:,} {copies or 'moved training embeddings'}"


def engines(e: dict) -> list[str]:
    out = [f"{made_of(e['catalogue'], e['real_items'], e.get('copies'))}, {e['queries']:,} queries, "
           f"HNSW M={e['settings']['M']}, "
           f"ef_construction={e['settings']['ef_construction']}, ef_search={e['settings']['ef_search']}; "
           f"one query at a time on one thread.", "",
           "| engine | build (2 threads) | on disk | in memory | recall@10 | one query p50 | p99 | p99, search CPU time |",
           "|---|---|---|---|---|---|---|---|"]
    for name, r in e["engines"].items():
        q = r["one_query"]
        # A database engine (milvus): its server's threads search, so neither this process's
        # memory nor the calling thread's CPU time is the search's (not recorded).
        memory = mb(r["memory_bytes"]) if r.get("memory_bytes") else "–"
        cpu = f"{ms(q['cpu']['p99_ms'])} ms" if "cpu" in q else "–"
        label = f"{name} {r['version']}" + (f" ({r['server']})" if r.get("server") else "")
        out.append(f"| {label} | {r['build_s']:.1f} s | {mb(r['disk_bytes'])} | {memory} "
                   f"| {r['recall_at_10']:.4f} | {ms(q['p50_ms'])} ms | {ms(q['p99_ms'])} ms | {cpu} |")
    for name, r in e["engines"].items():
        if r["one_query"]["n"] != e["queries"]:
            out += ["", f"{name}: recall@10 from all {e['queries']:,} queries in one call; latency from the first "
                        f"{r['one_query']['n']:,}, one call each."]
    sweeps = {name: r["ef_search_sweep"] for name, r in e["engines"].items() if "ef_search_sweep" in r}
    if sweeps:
        names = list(sweeps)
        out += ["", "The same graphs at each ef_search (recall@10; search CPU time p50 of one query):", "",
                "| ef_search | " + " | ".join(f"{n} recall@10 | {n} CPU p50" for n in names) + " |",
                "|---|" + "---|---|" * len(names)]
        for i, row in enumerate(sweeps[names[0]]):
            cells = [f"{sweeps[n][i]['recall_at_10']:.4f} | {ms(sweeps[n][i]['cpu_p50_ms'])} ms" for n in names]
            out.append(f"| {row['ef_search']} | " + " | ".join(cells) + " |")
    return out


def scale(sc: dict) -> list[str]:
    out = ["| items | made of | build (threads) | on disk | in memory | recall@10 | one query p50 / p99 "
           "| p99, search CPU time | batch of 32, per query | batch of 256, per query "
           "| exact search, per query (2 threads) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(sc.items(), key=lambda kv: int(kv[0])):
        b32, b256 = r["batches_one_thread"]
        out.append(f"| {int(n):,} | {made_of(int(n), r['real_items'], r.get('copies'))} "
                   f"| {r['build_s']:.1f} s ({r['build_threads']}) | {mb(r['disk_bytes'])} "
                   f"| {mb(r['memory_bytes'])} | {r['recall_at_10']:.4f} "
                   f"| {ms(r['one_query_one_thread']['p50_ms'])} / {ms(r['one_query_one_thread']['p99_ms'])} ms "
                   f"| {ms(r['one_query_one_thread']['cpu']['p99_ms'])} ms "
                   f"| {ms(b32['per_query_ms'])} ms | {ms(b256['per_query_ms'])} ms "
                   f"| {ms(r['exact_search_ms_per_query_all_threads'])} ms |")
    big = max(sc, key=int)
    out += ["", f"ef_search at {int(big):,} items (one query, one thread):", "",
            "| ef_search | recall@10 | p50 | p99 |", "|---|---|---|---|"]
    out += [f"| {r['ef_search']} | {r['recall_at_10']:.4f} | {ms(r['p50_ms'])} ms | {ms(r['p99_ms'])} ms |"
            for r in sc[big]["ef_search_sweep"]]
    return out


def main(path: str) -> None:
    doc = json.loads(open(path).read())
    parts = []
    if "quality" in doc:
        parts += ["### Quality", "", *quality(doc["quality"]), ""]
    if "engines" in doc:
        parts += ["### Engines", "", *engines(doc["engines"]), ""]
    if "scale" in doc:
        parts += ["### Scale", "", *scale(doc["scale"]), ""]
    print("\n".join(parts))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", nargs="?", default="bench/cpu/search.json",
                    help="a `fmnist bench search` record (default: bench/cpu/search.json)")
    main(ap.parse_args().record)
