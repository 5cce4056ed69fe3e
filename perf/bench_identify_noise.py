"""Identify under noise and tempo, against the exhaustive oracle (issue 17). Report, don't assert.

    .venv/bin/python perf/bench_identify_noise.py [--tracks 60] [--queries 60] [--seed 17]

Builds its own seeded set, following the feature recipe of shared/data/audio/manifest.json:
  * 60 tracks spoken by espeak-ng (Debian packages espeak-ng and sox; installed with apt-get when
    missing) from paragraphs of this repository's docs/, voices and speeds drawn from the manifest's
    lists, resampled by sox to 16 kHz mono 16-bit, 1 LSB of seeded dither;
  * pooled log-mel frames: 400-sample periodic Hann windows zero-padded to 1024, hop 160, 128 HTK mel
    triangles 20-8000 Hz on |rfft|^2, log(mel + 0.01), mean of every 4 frames, minus the set's mean
    frame, L2-normalised (25 frames a second);
  * per condition, `--queries` excerpts of 48,240 samples (75 pooled frames) from a random track at a
    random sample offset (or a frame boundary for "aligned"), sox `tempo` for the tempo cases, white
    noise at the SNR against the excerpt's power, gain 0.7, the same features centred with the set's
    mean frame.
The oracle is exhaustive rigid alignment: the start (within one track) with the best mean per-frame
inner product over all 75 frames. A hit is the right track with the start within one frame of the
excerpt's true start (its sample offset / 640). Vibrato: the frames ingested and compacted as far as
they go (archive), identify(k=5, ef=100, search tier all), p50 over the queries.

The synthesized signals are cached in --work (default /tmp/vibrato-identify-noise-<seed>). Results are
printed and saved to perf/results/bench_identify_noise.json.
"""
import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vibrato.engine import Engine  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SR, WIN, NFFT, HOP, POOL, N_MELS = 16000, 400, 1024, 160, 4, 128
QUERY_FRAMES = 75
QUERY_SAMPLES = (QUERY_FRAMES * POOL - 1) * HOP + WIN  # 48,240
FRAME_SAMPLES = POOL * HOP                              # 640 samples per pooled frame
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
          "en-us-nyc"]
VARIANTS = ["", "+f1", "+f2", "+f3", "+f4", "+f5", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7"]
CONDITIONS = [  # (name, frame-aligned, snr dB, tempo)
    ("aligned, 20 dB", True, 20.0, 1.0),
    ("random offset, 20 dB", False, 20.0, 1.0),
    ("random offset, 15 dB", False, 15.0, 1.0),
    ("random offset, 10 dB", False, 10.0, 1.0),
    ("random offset, 5 dB", False, 5.0, 1.0),
    ("tempo x0.97, 20 dB", False, 20.0, 0.97),
    ("tempo x1.03, 20 dB", False, 20.0, 1.03),
]


# ------------------------------------------------------------------------------------------ audio
def ensure_tools():
    if shutil.which("espeak-ng") and shutil.which("sox"):
        return
    print("installing espeak-ng and sox (apt-get)", file=sys.stderr, flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "espeak-ng", "sox"], check=True, stdout=subprocess.DEVNULL)


def texts(n: int, rng) -> list:
    """n paragraphs of 55-95 words from the repository's docs (markdown stripped)."""
    words = []
    for p in sorted((ROOT / "docs").glob("*.md")):
        body = re.sub(r"```.*?```", " ", p.read_text(), flags=re.S)
        body = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("|"))
        body = re.sub(r"[`*_#>\[\]()|<>]", " ", body)
        words.extend(w for w in body.split() if re.search(r"[A-Za-z]", w) and len(w) < 25)
    out, at = [], 0
    for _ in range(n):
        k = int(rng.integers(55, 96))
        if at + k > len(words):
            at = int(rng.integers(0, len(words) // 2))
        out.append(" ".join(words[at:at + k]))
        at += k
    return out


def read_wav(path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == SR and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def write_wav(path, x: np.ndarray):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(x, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())


def synthesize(work: Path, n_tracks: int, seed: int) -> list:
    cache = work / "tracks.npz"
    if cache.exists():
        z = np.load(cache)
        return [z[f"t{i}"] for i in range(n_tracks)]
    ensure_tools()
    rng = np.random.default_rng([seed, 1])
    signals = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts(n_tracks, rng)):
            voice = str(rng.choice(VOICES)) + str(rng.choice(VARIANTS))
            speed = int(rng.integers(140, 191))
            (Path(tmp) / "t.txt").write_text(text)
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-f", f"{tmp}/t.txt", "-w", f"{tmp}/t.wav"],
                           check=True, stderr=subprocess.DEVNULL)
            subprocess.run(["sox", "-D", f"{tmp}/t.wav", "-r", str(SR), "-c", "1", "-b", "16", "-e", "signed-integer",
                            f"{tmp}/track.wav"], check=True)
            x = read_wav(f"{tmp}/track.wav")
            x = x + np.random.default_rng([42, 100, i]).normal(0, 1 / 32768, x.shape).astype(np.float32)
            signals.append(x)
            print(f"  track {i}: {voice} {speed} wpm, {x.shape[0] / SR:.1f} s", file=sys.stderr, flush=True)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"t{i}": s for i, s in enumerate(signals)})
    return signals


def tempo(x: np.ndarray, factor: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        write_wav(f"{tmp}/in.wav", x)
        subprocess.run(["sox", f"{tmp}/in.wav", f"{tmp}/out.wav", "tempo", str(factor)], check=True)
        return read_wav(f"{tmp}/out.wav")


# ------------------------------------------------------------------------------------------ features
def mel_filterbank() -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(20.0), hz_to_mel(8000.0), N_MELS + 2))
    freqs = np.arange(NFFT // 2 + 1) * SR / NFFT
    fb = np.zeros((N_MELS, freqs.shape[0]), dtype=np.float64)
    for m in range(N_MELS):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        fb[m] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return fb


_FB = mel_filterbank()
_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / WIN)).astype(np.float64)  # periodic


def pooled_logmel(x: np.ndarray) -> np.ndarray:
    """(frames, 128) pooled log-mel of samples x (not centred, not normalised)."""
    n = 1 + (x.shape[0] - WIN) // HOP
    idx = np.arange(WIN)[None, :] + HOP * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(x[idx].astype(np.float64) * _HANN, n=NFFT)) ** 2
    logm = np.log(spec @ _FB.T + 0.01)
    m = n // POOL
    return logm[:m * POOL].reshape(m, POOL, N_MELS).mean(axis=1)


def finish(frames: np.ndarray, mean: np.ndarray) -> np.ndarray:
    f = frames - mean
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------ set
def build_queries(signals, firsts, mean, cond, n, seed):
    name, aligned, snr, factor = cond
    rng = np.random.default_rng([seed, 4, CONDITIONS.index(cond)])
    out = []
    for _ in range(n):
        t = int(rng.integers(0, len(signals)))
        x = signals[t]
        need = int(np.ceil(QUERY_SAMPLES * factor)) + (2 * FRAME_SAMPLES if factor != 1.0 else 0)
        if aligned:
            o = FRAME_SAMPLES * int(rng.integers(0, (x.shape[0] - need) // FRAME_SAMPLES))
        else:
            o = int(rng.integers(0, x.shape[0] - need))
        ex = x[o:o + need]
        if factor != 1.0:
            ex = tempo(ex, factor)
        ex = ex[:QUERY_SAMPLES]
        if ex.shape[0] < QUERY_SAMPLES:
            ex = np.pad(ex, (0, QUERY_SAMPLES - ex.shape[0]))
        power = float(np.mean(ex.astype(np.float64) ** 2))
        noisy = (ex + rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), ex.shape)) * 0.7
        q = finish(pooled_logmel(noisy.astype(np.float32)), mean)
        assert q.shape[0] == QUERY_FRAMES, q.shape
        out.append((q, t, firsts[t] + o / FRAME_SAMPLES))
    return out


def oracle(frames, firsts, counts, q):
    """The best rigid alignment's start over every start inside one track."""
    S = q @ frames.T  # (75, N)
    n = frames.shape[0] - QUERY_FRAMES + 1
    acc = np.zeros(n, dtype=np.float64)
    for k in range(QUERY_FRAMES):
        acc += S[k, k:k + n]
    valid = np.zeros(n, dtype=bool)
    for f, c in zip(firsts, counts):
        valid[f:f + c - QUERY_FRAMES + 1] = True
    acc[~valid] = -np.inf
    return int(np.argmax(acc))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracks", type=int, default=60)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--ef", type=int, default=100)
    args = ap.parse_args()
    work = args.work or Path(f"/tmp/vibrato-identify-noise-{args.seed}")
    signals = synthesize(work, args.tracks, args.seed)
    raw = [pooled_logmel(x) for x in signals]
    counts = [r.shape[0] for r in raw]
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    allraw = np.concatenate(raw)
    mean = allraw.mean(axis=0)
    frames = finish(allraw, mean)
    track_of = np.repeat(np.arange(len(raw)), counts)
    res = {"tracks": len(raw), "frames": int(frames.shape[0]), "queries": args.queries, "k": args.k, "ef": args.ef,
           "conditions": {}}
    print(f"{len(raw)} tracks, {frames.shape[0]} frames", flush=True)
    root = Path(tempfile.mkdtemp(prefix="vibrato-identify-noise-"))
    try:
        with Engine.open(root / "d", dim=N_MELS, background=False, checkpoint_max_rows=10_000,
                         compaction_max_inputs=2) as eng:
            for lo in range(0, frames.shape[0], 10_000):
                eng.ingest_batch([{"vector": frames[i], "metadata": {"source_file": f"track{int(track_of[i])}.wav",
                                                                     "start_time_ms": int(i - firsts[track_of[i]]) * 40,
                                                                     "duration_ms": 40}}
                                  for i in range(lo, min(lo + 10_000, frames.shape[0]))])
                eng.checkpoint()
            while eng.compact()["state"] != "idle":
                pass
            res["segments"] = eng.stats()["segments_by_level"]
            print(f"segments {res['segments']}", flush=True)
            print(f"| condition | Vibrato top-1 | right track | oracle top-1 | ratio | Vibrato p50 |")
            print("|---|---:|---:|---:|---:|---:|")
            for cond in CONDITIONS:
                qs = build_queries(signals, firsts, mean, cond, args.queries, args.seed)
                hit = track_hit = ohit = 0
                lat = []
                for q, t, true_start in qs:
                    t0 = time.perf_counter()
                    out = eng.identify(q, k=args.k, ef=args.ef, search_tier="all", include_metadata=False)
                    lat.append(time.perf_counter() - t0)
                    if out:
                        got = int(out[0]["id"])
                        track_hit += int(track_of[got] == t)
                        hit += int(track_of[got] == t and abs(got - true_start) <= 1)
                    o = oracle(frames, firsts, counts, q)
                    ohit += int(track_of[o] == t and abs(o - true_start) <= 1)
                n = len(qs)
                row = {"top1": hit / n, "right_track": track_hit / n, "oracle_top1": ohit / n,
                       "ratio_to_oracle": round(hit / ohit, 3) if ohit else None,
                       "p50_ms": round(statistics.median(lat) * 1e3, 2)}
                res["conditions"][cond[0]] = row
                print(f"| {cond[0]} | {row['top1']:.2f} | {row['right_track']:.2f} | {row['oracle_top1']:.2f} | "
                      f"{row['ratio_to_oracle']} | {row['p50_ms']:.1f} ms |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_identify_noise.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
