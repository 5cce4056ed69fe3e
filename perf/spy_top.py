"""Summarise a py-spy raw (collapsed-stack) profile: the functions with the most samples, by self
time and by inclusive time, per thread name.

    .venv/bin/python perf/spy_top.py PROFILE.txt [--top 30]
"""
import argparse
import collections
import re


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--thread", help="only stacks of threads whose name contains this (e.g. MainThread)")
    args = ap.parse_args()
    self_t, incl, threads = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for line in open(args.profile):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        if args.thread and args.thread not in frames[0]:
            total -= n
            continue
        threads[re.sub(r"\d+", "N", frames[0])] += n
        funcs = [re.sub(r" \(.*?/(vibrato|site-packages|lib/python3\.\d+)/", r" (\1/", f) for f in frames[1:]]
        if funcs:
            self_t[funcs[-1]] += n
        for f in set(funcs):
            incl[f] += n
    print(f"{total} samples\n\nby thread:")
    for t, n in threads.most_common(10):
        print(f"  {100 * n / total:5.1f}%  {t}")
    for title, c in (("self", self_t), ("inclusive", incl)):
        print(f"\ntop {args.top} by {title} samples:")
        for f, n in c.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {f}")


if __name__ == "__main__":
    main()
