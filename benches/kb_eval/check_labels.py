#!/usr/bin/env python3
"""Validate the Fuke Shop support KB and the kb_eval question set.

Standard library only. Usage:
    python3 benches/kb_eval/check_labels.py [--kb kb/support] [--questions benches/kb_eval/questions.jsonl]

Parsing rules (must match the chunker):
  * Markdown (.md): one `# Title` line, sections start at `## Heading` lines.
  * HTML (.html): one <h1>, sections start at <h2>...</h2>.
  * Plain text (.txt): first line is the title, sections start at `== Title ==` lines.
"""
import argparse
import html
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EN_WORDS = (40, 130)
ZH_CHARS = (80, 250)
SECTIONS = (6, 10)


def parse_md(text):
    title, sections, cur = None, [], None
    for line in text.splitlines():
        if line.startswith("## "):
            cur = [line[3:].strip(), []]
            sections.append(cur)
        elif line.startswith("# ") and title is None and not sections:
            title = line[2:].strip()
        elif cur is not None:
            cur[1].append(line)
    return title, [(h, "\n".join(b)) for h, b in sections]


def strip_tags(s):
    return html.unescape(re.sub(r"<[^>]+>", " ", s))


def parse_html(text):
    m = re.search(r"<h1[^>]*>(.*?)</h1>", text, re.S | re.I)
    title = strip_tags(m.group(1)).strip() if m else None
    parts = re.split(r"<h2[^>]*>(.*?)</h2>", text, flags=re.S | re.I)
    sections = []
    for i in range(1, len(parts), 2):
        body = re.sub(r"</body>.*", "", parts[i + 1], flags=re.S | re.I)
        sections.append((strip_tags(parts[i]).strip(), strip_tags(body)))
    return title, sections


def parse_txt(text):
    lines = text.splitlines()
    title = lines[0].strip() if lines else None
    sections, cur = [], None
    for line in lines[1:]:
        m = re.fullmatch(r"== (.+) ==", line.strip())
        if m:
            cur = [m.group(1).strip(), []]
            sections.append(cur)
        elif cur is not None:
            cur[1].append(line)
    return title, [(h, "\n".join(b)) for h, b in sections]


PARSERS = {".md": parse_md, ".html": parse_html, ".txt": parse_txt}


def size_of(lang, body):
    body = re.sub(r"[*_`]", "", body)
    if lang == "zh":
        return len(re.sub(r"\s", "", body))
    return len(body.split())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kb", default=str(ROOT / "kb" / "support"))
    ap.add_argument("--questions", default=str(ROOT / "benches" / "kb_eval" / "questions.jsonl"))
    args = ap.parse_args()
    kb = Path(args.kb)
    errors, warnings = [], []
    headings = {}  # rel path -> set(heading)

    print("== KB files ==")
    for path in sorted(kb.rglob("*")):
        if not path.is_file() or path.suffix not in PARSERS:
            continue
        rel = path.relative_to(kb).as_posix()
        lang = rel.split("/")[0]
        text = path.read_text(encoding="utf-8")
        title, sections = PARSERS[path.suffix](text)
        if not title:
            errors.append(f"{rel}: missing title")
        if not SECTIONS[0] <= len(sections) <= SECTIONS[1]:
            errors.append(f"{rel}: {len(sections)} sections (want {SECTIONS[0]}-{SECTIONS[1]})")
        names = [h for h, _ in sections]
        for h, n in Counter(names).items():
            if n > 1:
                errors.append(f"{rel}: duplicate heading {h!r}")
        lo, hi = ZH_CHARS if lang == "zh" else EN_WORDS
        sizes = []
        for h, body in sections:
            n = size_of(lang, body)
            sizes.append(n)
            if not lo <= n <= hi:
                warnings.append(f"{rel}#{h}: size {n} outside {lo}-{hi}")
        headings[rel] = set(names)
        unit = "chars" if lang == "zh" else "words"
        print(f"  {rel:22s} sections={len(sections):2d}  {unit} min/max={min(sizes)}/{max(sizes)}  title={title!r}")

    print("\n== Questions ==")
    per_lang = Counter()
    per_file = Counter()
    per_label = Counter()
    oos = Counter()
    ids = set()
    with open(args.questions, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {ln}: bad JSON: {e}")
                continue
            for k in ("id", "lang", "q", "answers"):
                if k not in q:
                    errors.append(f"line {ln}: missing key {k}")
            qid = q.get("id")
            if qid in ids:
                errors.append(f"line {ln}: duplicate id {qid}")
            ids.add(qid)
            lang = q.get("lang")
            per_lang[lang] += 1
            if not q.get("answers"):
                oos[lang] += 1
            for label in q.get("answers", []):
                rel, sep, head = label.partition("#")
                if not sep:
                    errors.append(f"{qid}: label without '#': {label}")
                    continue
                if rel not in headings:
                    errors.append(f"{qid}: unknown file {rel}")
                    continue
                if head not in headings[rel]:
                    errors.append(f"{qid}: unknown heading {head!r} in {rel}")
                    continue
                if not rel.startswith(f"{lang}/"):
                    errors.append(f"{qid}: lang {lang} but label in {rel}")
                per_file[rel] += 1
                per_label[label] += 1

    for lang in sorted(per_lang):
        print(f"  lang={lang}: {per_lang[lang]} questions ({oos[lang]} out-of-scope)")
    print(f"  total: {sum(per_lang.values())}")
    print("\n  labels per file:")
    for rel in sorted(headings):
        covered = sum(1 for h in headings[rel] if per_label[f"{rel}#{h}"])
        print(f"    {rel:22s} {per_file[rel]:3d} labels, {covered}/{len(headings[rel])} sections covered")

    for w in warnings:
        print("WARN:", w)
    for e in errors:
        print("ERROR:", e)
    print("\nOK" if not errors else f"\n{len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
