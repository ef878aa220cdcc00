"""Prepare audio corpora into the ArrayRecord shards the trainer reads (issue 14).

    python -m data.prepare --input=<manifest.jsonl | corpus dir> --output=<dir> \
        --glm_tokenizer=<glm-4-voice-tokenizer> --text_tokenizer=<folder with tiktoken.model> \
        --runner=DirectRunner [--direct_num_workers=2 --direct_running_mode=multi_processing]

Flags of this module are absl flags; every other flag (`--runner`, `--project`, `--region`,
`--temp_location`, `--flink_master`, ...) goes to Beam's `PipelineOptions` unchanged. See
`data/__init__.py` and `data/pipeline.py` for what is written; README "Data preparation" for the
Dataflow / Flink commands.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

_INPUT = flags.DEFINE_list("input", None, "manifests (.jsonl) / corpus folders", required=True)
_OUTPUT = flags.DEFINE_string(
    "output", None, "output folder (shards, markers, card)", required=True
)
_KIND = flags.DEFINE_enum(
    "input_kind",
    None,
    ["sft", "audio_jsonl", "librispeech", "aishell", "wenetspeech"],
    "input format (default: detected from the path)",
)
_GLM = flags.DEFINE_string(
    "glm_tokenizer", None, "glm-4-voice-tokenizer folder or Orbax dir", required=True
)
_TEXT = flags.DEFINE_string(
    "text_tokenizer", None, "folder with tiktoken.model (+ tokenizer_config.json)"
)
_SHARDS = flags.DEFINE_integer("num_shards", 0, "shards (0: ceil(rows / rows_per_shard))")
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 1000, "rows per shard when num_shards=0")
_LANGS = flags.DEFINE_list("languages", ["en", "zh"], "transcript languages kept (others: dropped)")
_MIN_RATE = flags.DEFINE_integer("min_sample_rate", 16000, "files below this rate are dropped")
_BATCH = flags.DEFINE_integer("batch_size", 8, "segments per tokenizer / model-stage call")
_MAX_S = flags.DEFINE_float("max_segment_s", 27.0, "segment cap (report: 27 s)")
_MIN_S = flags.DEFINE_float("min_segment_s", 1.0, "shorter segments are dropped")
_GAP_S = flags.DEFINE_float(
    "max_gap_s", 2.0, "merge segments across silences up to this (report: 2 s)"
)
_ENH = flags.DEFINE_string(
    "enhancement_model", None, "DeepFilterNet model folder (stage off if unset)"
)
_DIAR = flags.DEFINE_string(
    "diarization_model", None, "pyannote pipeline folder (stage off if unset)"
)
_ASR = flags.DEFINE_enum(
    "transcription",
    None,
    ["kimi-audio", "paraformer-zh"],
    "transcribe untranscribed segments (stage off if unset)",
)
_ASR_MODEL = flags.DEFINE_string(
    "transcription_model", None, "model folder of the transcription stage"
)
_DTYPE = flags.DEFINE_enum("model_dtype", "float32", ["float32", "bfloat16"], "KimiAudio ASR dtype")


def config():
    from data.pipeline import PrepareConfig
    from data.segmentation import SegmentationConfig

    return PrepareConfig(
        output=_OUTPUT.value,
        glm_tokenizer=_GLM.value,
        text_tokenizer=_TEXT.value,
        num_shards=_SHARDS.value,
        rows_per_shard=_ROWS_PER_SHARD.value,
        languages=tuple(_LANGS.value),
        min_sample_rate=_MIN_RATE.value,
        batch_size=_BATCH.value,
        segmentation=SegmentationConfig(
            max_s=_MAX_S.value, min_segment_s=_MIN_S.value, max_gap_s=_GAP_S.value
        ),
        input_kind=_KIND.value,
    )


def main(argv: list[str]) -> None:
    from data import pipeline, stages

    beam_args = argv[1:]
    st = stages.build_stages(
        enhancement=_ENH.value,
        diarization=_DIAR.value,
        transcription=_ASR.value,
        transcription_model=_ASR_MODEL.value,
        dtype=_DTYPE.value,
    )
    res = pipeline.run(_INPUT.value, config(), beam_args, st)
    c = res["card"]
    logging.info(
        "card: %s",
        json.dumps(
            {
                k: c[k]
                for k in (
                    "rows_in",
                    "rows_written",
                    "rows_dropped",
                    "drops_by_reason",
                    "hours",
                    "segments",
                )
            }
        ),
    )
    print(
        f"{res['shards_written']} shards written; "
        f"{c['finished_shards']}/{c['num_shards']} finished; "
        f"{c['hours']:.4f} h, {c['segments']} segments, {c['conversations']} conversations, "
        f"{c['rows_dropped']} rows dropped {c['drops_by_reason']}"
    )


def _parse(argv: list[str]) -> list[str]:
    """absl flags of this module; the rest (Beam's) is kept for PipelineOptions."""
    return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
    app.run(main, argv=sys.argv, flags_parser=_parse)
