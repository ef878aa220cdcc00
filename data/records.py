"""Prepared segments / conversations -> the record families of training.md §2 (msgpack maps,
written by `kimia_jax.training.data.write_records`, read back by its `ArrayRecordSource`,
`AudioShards`, `pretrain_builder` and `sft_builder` unchanged).

Files of shard k of n (names of spec §2.1):
    pt_docs-k-of-n.array_record   one record per document chunk (<= 600 s or 64 segments)
    audio-k-of-n.array_record     one record per (segment, version): 16-bit FLAC at 16 kHz
    sft-k-of-n.array_record       one record per SFT conversation (`SftExampleBuilder.record`
                                  format; waveforms inline as float32 16 kHz arrays)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

SR = 16000
CHUNK_MAX_S = 600.0
CHUNK_MAX_SEGMENTS = 64


def shard_name(family: str, shard: int, num_shards: int) -> str:
    return f"{family}-{shard:05d}-of-{num_shards:05d}.array_record"


def flac_16k(wav: np.ndarray) -> bytes:
    """Mono 16 kHz 16-bit FLAC of a float waveform (round to int16, lossless for 16-bit input)."""
    import soundfile as sf

    pcm = np.clip(np.round(np.asarray(wav, np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def segment_order(seg: dict[str, Any]) -> tuple:
    return (seg["doc_id"], seg["order"], seg["row_id"], seg["sub"])


def _ragged(parts: Sequence[np.ndarray | None], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    arrs = [np.asarray(p if p is not None else [], dtype) for p in parts]
    flat = np.concatenate(arrs) if arrs else np.zeros((0,), dtype)
    return flat.astype(dtype), np.asarray([len(a) for a in arrs], np.int32)


def pt_records(
    segments: Sequence[dict[str, Any]],
    shard: int,
    *,
    chunk_max_s: float = CHUNK_MAX_S,
    chunk_max_segments: int = CHUNK_MAX_SEGMENTS,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pt_docs records, audio records) of one shard's segments (any order in, sorted here)."""
    segs = sorted(segments, key=segment_order)
    audio: list[dict[str, Any]] = []
    docs: list[dict[str, Any]] = []
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for s in segs:
        by_doc.setdefault(s["doc_id"], []).append(s)
    for doc_id, ss in by_doc.items():
        refs_orig, refs_enh = [], []
        for i, s in enumerate(ss):
            refs_orig.append((shard, len(audio)))
            audio.append(
                {
                    "doc_id": doc_id,
                    "seg_index": np.int32(i),
                    "version": "orig",
                    "flac_16k": flac_16k(s["wav"]),
                    "num_samples": np.int64(len(s["wav"])),
                }
            )
            if s.get("wav_enh") is not None:
                refs_enh.append((shard, len(audio)))
                audio.append(
                    {
                        "doc_id": doc_id,
                        "seg_index": np.int32(i),
                        "version": "enh",
                        "flac_16k": flac_16k(s["wav_enh"]),
                        "num_samples": np.int64(len(s["wav_enh"])),
                    }
                )
        chunk: list[int] = []
        chunks: list[list[int]] = []
        dur = 0.0
        for i, s in enumerate(ss):
            d = len(s["wav"]) / SR
            if chunk and (len(chunk) >= chunk_max_segments or dur + d > chunk_max_s):
                chunks.append(chunk)
                chunk, dur = [], 0.0
            chunk.append(i)
            dur += d
        chunks.append(chunk)
        for ci, idx in enumerate(chunks):
            docs.append(
                _doc_record(
                    doc_id,
                    ci,
                    [ss[i] for i in idx],
                    [refs_orig[i] for i in idx],
                    [refs_enh[i] for i in idx] if refs_enh else None,
                )
            )
    return docs, audio


def _doc_record(
    doc_id: str,
    chunk_index: int,
    ss: Sequence[dict[str, Any]],
    refs: Sequence[tuple[int, int]],
    refs_enh: Sequence[tuple[int, int]] | None,
) -> dict[str, Any]:
    has_text = [s.get("text_ids") is not None for s in ss]
    text_flat, text_len = _ragged([s.get("text_ids") for s in ss], np.int32)
    codes_flat, codes_len = _ragged([s["codes"] for s in ss], np.uint16)
    rec: dict[str, Any] = {
        "doc_id": doc_id,
        "chunk_index": np.int32(chunk_index),
        "source": ss[0]["source"],
        "num_segments": np.int32(len(ss)),
        "row_id": [s["row_id"] for s in ss],
        "seg_start_s": np.asarray([s["start_s"] for s in ss], np.float32),
        "seg_end_s": np.asarray([s["end_s"] for s in ss], np.float32),
        "seg_speaker": np.asarray([s.get("speaker", 0) for s in ss], np.int32),
        "seg_lang": [s.get("language") or "" for s in ss],
        "seg_lang_prob": np.asarray([s.get("language_prob", 1.0) for s in ss], np.float32),
        "seg_has_text": np.asarray(has_text, bool),
        "text": [s.get("text") or "" if h else "" for s, h in zip(ss, has_text, strict=True)],
        "text_ids_flat": text_flat,
        "text_ids_len": text_len,
        "asr_model": [s.get("asr_model", "") for s in ss],
        "codes_orig_flat": codes_flat,
        "codes_len": codes_len,
        "audio_ref_orig": np.asarray(refs, np.int64).reshape(-1, 2),
        "num_samples_16k": np.asarray([len(s["wav"]) for s in ss], np.int64),
    }
    if refs_enh is not None:
        f, n = _ragged([s["codes_enh"] for s in ss], np.uint16)
        rec["codes_enh_flat"], rec["codes_enh_len"] = f, n
        rec["audio_ref_enh"] = np.asarray(refs_enh, np.int64).reshape(-1, 2)
        rec["num_samples_16k_enh"] = np.asarray([len(s["wav_enh"]) for s in ss], np.int64)
    return rec


def sft_record(conv: dict[str, Any]) -> dict[str, Any]:
    """A prepared conversation (`messages` with `kind`, `text`, `text_ids`, `codes`, `audio`) ->
    the record `SftExampleBuilder.record` reads."""
    msgs = []
    for m in conv["messages"]:
        out: dict[str, Any] = {"role": m["role"], "kind": m["kind"]}
        for k in ("text", "text_ids", "codes", "audio", "loss"):
            if m.get(k) is not None:
                out[k] = m[k]
        msgs.append(out)
    return {
        "row_id": conv["row_id"],
        "task": conv["task"],
        "output_type": conv["output_type"],
        "messages": msgs,
    }
