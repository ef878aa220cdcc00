"""Pluggable model stages of the preparation pipeline (training.md §1.2 A, B, G, H).

One interface (`ModelStage`): `check()` runs when the pipeline is built (the package and the local
weights must be there; a missing one raises `StageUnavailableError` naming the flag to set, before
any audio is read; nothing is ever downloaded), `setup()` loads the model once per Beam worker,
`process(items)` handles a batch of items in place. A stage is only in the graph when its flag
asks for it (`--enhancement`, `--diarization`, `--transcription`).

Recording-level stages see `{"wav": float32 [L] 16 kHz, ...}` per recording: enhancement adds
`wav_enh` (16 kHz), diarization adds `turns` (list of `segmentation.Region`). Segment-level stages
(transcription) see segments without a transcript and set `text`, `language`, `asr_model`.

Stages here:
* `KimiAsrStage` — our own `KimiAudio` (ASR prompt, greedy text), runs in this project.
* `PyannoteDiarization`, `ParaformerAsr`, `DeepFilterNetEnhancement` — wrappers of
  `pyannote.audio`, `funasr` and `deepfilternet`; those packages are not dependencies of this
  project, so `check()` fails clearly unless the user installed them and points the flag at local
  weights. Their `process` calls the packages' documented inference APIs (not exercised by our
  tests: the packages are not installed here).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.manifests import guess_language
from data.segmentation import Region
from kimia_jax.errors import StageUnavailableError

SR = 16000
ASR_PROMPT = "请将音频内容转换为文字。"  # the official Kimi-Audio ASR example's instruction


class ModelStage:
    """Base class. Subclasses set `name`, `level` ("recording" / "segment") and `flag`."""

    name = "stage"
    level = "segment"
    flag = ""
    package: str | None = None

    def __init__(self, weights: str | None) -> None:
        self.weights = weights

    def check(self) -> None:
        if self.package and importlib.util.find_spec(self.package.split(".")[0]) is None:
            raise StageUnavailableError(
                f"{self.flag}: stage {self.name!r} needs the python package {self.package!r}, "
                "which is not installed (install it, or leave the flag unset to skip the stage)"
            )
        if not self.weights:
            raise StageUnavailableError(
                f"{self.flag}: stage {self.name!r} needs a local model folder (nothing is "
                "downloaded); pass its path"
            )
        if not Path(self.weights).exists():
            raise StageUnavailableError(
                f"{self.flag}={self.weights}: no such model folder for stage {self.name!r} "
                "(nothing is downloaded; fetch the weights first)"
            )

    def setup(self) -> None:
        raise NotImplementedError

    def process(self, items: list[dict[str, Any]]) -> None:
        raise NotImplementedError


class KimiAsrStage(ModelStage):
    """Transcription with our `KimiAudio` (text output, greedy): the report's ASR role played by
    Kimi-Audio itself. Language: script guess of the transcript (`manifests.guess_language`)."""

    name = "kimi-audio-asr"
    flag = "--transcription_model"

    def __init__(
        self,
        weights: str | None,
        *,
        dtype: str = "float32",
        max_new_tokens: int = 256,
        prompt: str = ASR_PROMPT,
    ) -> None:
        super().__init__(weights)
        self.dtype, self.max_new_tokens, self.prompt = dtype, max_new_tokens, prompt
        self.model: Any = None

    def check(self) -> None:
        super().check()
        from kimia_jax.configs import layout
        from kimia_jax.conversion.kimia import check_model_folder

        root = Path(self.weights)  # type: ignore[arg-type]
        try:
            check_model_folder(root, root / layout.GLM_TOKENIZER_DIR, load_detokenizer=False)
        except FileNotFoundError as e:
            raise StageUnavailableError(f"{self.flag}={root}: {e}") from e

    def setup(self) -> None:
        from kimia_jax.inference.api import KimiAudio

        self.model = KimiAudio(self.weights, load_detokenizer=False, dtype=self.dtype)

    def transcribe(self, wavs: Sequence[np.ndarray]) -> list[str]:
        chats = [
            [
                {"role": "user", "message_type": "text", "content": self.prompt},
                {"role": "user", "message_type": "audio", "content": w},
            ]
            for w in wavs
        ]
        out = self.model.generate_batch(
            chats, "text", text_temperature=0.0, max_new_tokens=self.max_new_tokens
        )
        return [t for _, t in out]

    def process(self, items: list[dict[str, Any]]) -> None:
        texts = self.transcribe([it["wav"] for it in items])
        for it, t in zip(items, texts, strict=True):
            it["text"], it["language"], it["asr_model"] = t, guess_language(t), self.name


class PyannoteDiarization(ModelStage):
    """pyannote-audio speaker diarization from a local pipeline folder (its config.yaml)."""

    name = "pyannote-diarization"
    level = "recording"
    flag = "--diarization_model"
    package = "pyannote.audio"

    def setup(self) -> None:
        from pyannote.audio import Pipeline

        p = Path(self.weights)  # type: ignore[arg-type]
        self.pipe = Pipeline.from_pretrained(str(p / "config.yaml" if p.is_dir() else p))

    def process(self, items: list[dict[str, Any]]) -> None:
        import torch

        for it in items:
            ann = self.pipe({"waveform": torch.from_numpy(it["wav"])[None], "sample_rate": SR})
            labels: dict[str, int] = {}
            turns = []
            for seg, _, spk in ann.itertracks(yield_label=True):
                k = labels.setdefault(spk, len(labels))
                turns.append(Region(int(seg.start * SR), int(seg.end * SR), k))
            it["turns"] = turns


def punctuate_from_timestamps(chars: Sequence[str], spans: Sequence[tuple[float, float]]) -> str:
    """Report step I: gap between consecutive characters in (0.5 s, 1.0 s] -> comma, > 1.0 s ->
    period (the boundary values are not specified by the report; this choice is ours)."""
    out = []
    for i, c in enumerate(chars):
        if i:
            gap = spans[i][0] - spans[i - 1][1]
            if gap > 1.0:
                out.append("。")
            elif gap > 0.5:
                out.append("，")
        out.append(c)
    return "".join(out)


class ParaformerAsr(ModelStage):
    """Paraformer-zh (funasr), character timestamps punctuated by `punctuate_from_timestamps`."""

    name = "paraformer-zh"
    flag = "--transcription_model"
    package = "funasr"

    def setup(self) -> None:
        from funasr import AutoModel

        self.model = AutoModel(model=self.weights, disable_update=True)

    def process(self, items: list[dict[str, Any]]) -> None:
        for it in items:
            res = self.model.generate(input=it["wav"], sentence_timestamp=False)[0]
            chars = res["text"].split()
            spans = [(a / 1000.0, b / 1000.0) for a, b in res.get("timestamp", [])]
            text = (
                punctuate_from_timestamps(chars, spans)
                if len(spans) == len(chars)
                else "".join(chars)
            )
            it["text"], it["language"], it["asr_model"] = text, "zh", self.name


class DeepFilterNetEnhancement(ModelStage):
    """DeepFilterNet3 (48 kHz) speech enhancement; the enhanced audio is resampled back to 16 kHz
    with the official loader's resampler and kept next to the original (report: both versions)."""

    name = "deepfilternet3"
    level = "recording"
    flag = "--enhancement_model"
    package = "df"

    def setup(self) -> None:
        from df.enhance import init_df

        self.model, self.state, _ = init_df(model_base_dir=self.weights)

    def process(self, items: list[dict[str, Any]]) -> None:
        import librosa
        import torch
        from df.enhance import enhance

        sr = self.state.sr()
        for it in items:
            x = librosa.resample(it["wav"], orig_sr=SR, target_sr=sr, res_type="soxr_hq")
            y = enhance(self.model, self.state, torch.from_numpy(x)[None]).numpy()[0]
            it["wav_enh"] = librosa.resample(y, orig_sr=sr, target_sr=SR, res_type="soxr_hq")


TRANSCRIPTION = {"kimi-audio": KimiAsrStage, "paraformer-zh": ParaformerAsr}


def build_stages(
    *,
    enhancement: str | None = None,
    diarization: str | None = None,
    transcription: str | None = None,
    transcription_model: str | None = None,
    dtype: str = "float32",
) -> list[ModelStage]:
    """The requested stages, each `check()`ed now (fails before the pipeline runs)."""
    stages: list[ModelStage] = []
    if enhancement:
        stages.append(DeepFilterNetEnhancement(enhancement))
    if diarization:
        stages.append(PyannoteDiarization(diarization))
    if transcription:
        if transcription not in TRANSCRIPTION:
            raise StageUnavailableError(
                f"--transcription={transcription!r}: choose one of {sorted(TRANSCRIPTION)}"
            )
        cls = TRANSCRIPTION[transcription]
        stages.append(
            cls(transcription_model, dtype=dtype)
            if cls is KimiAsrStage
            else cls(transcription_model)
        )
    for s in stages:
        s.check()
    return stages
