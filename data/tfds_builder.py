"""TFDS builders over prepared shards (`python -m data.prepare` output), `file_format=array_record`.

    from data.tfds_builder import KimiaPrepared
    b = KimiaPrepared(config="pt_docs", prepared_dir="prepared/", data_dir="~/tensorflow_datasets")
    b.download_and_prepare(file_format="array_record")
    # then, anywhere (no import of data/ needed, no TensorFlow needed):
    src = kimia_jax.training.data.TfdsSource("kimia_prepared/pt_docs", data_dir=...)

One builder, three configs (the record families of training.md §2.1): `pt_docs` and `audio` with
a typed feature per record field; `sft` keeps each conversation as its msgpack record (`record`
bytes; nested messages with optional fields have no fixed TFDS schema) next to `row_id` and
`task`. The `train` split is every record of the family, in shard order. TensorFlow is not needed:
TFDS writes and reads ArrayRecord without it (`tfds.data_source`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from kimia_jax.training import data as tdata


def _features(config: str) -> tfds.features.FeaturesDict:
    f = tfds.features
    text_seq = f.Sequence(f.Text())
    if config == "pt_docs":
        return f.FeaturesDict(
            {
                "doc_id": f.Text(),
                "chunk_index": f.Scalar(np.int32),
                "source": f.Text(),
                "num_segments": f.Scalar(np.int32),
                "row_id": text_seq,
                "seg_start_s": f.Tensor(shape=(None,), dtype=np.float32),
                "seg_end_s": f.Tensor(shape=(None,), dtype=np.float32),
                "seg_speaker": f.Tensor(shape=(None,), dtype=np.int32),
                "seg_lang": text_seq,
                "seg_lang_prob": f.Tensor(shape=(None,), dtype=np.float32),
                "seg_has_text": f.Tensor(shape=(None,), dtype=np.bool_),
                "text": text_seq,
                "text_ids_flat": f.Tensor(shape=(None,), dtype=np.int32),
                "text_ids_len": f.Tensor(shape=(None,), dtype=np.int32),
                "asr_model": text_seq,
                "codes_orig_flat": f.Tensor(shape=(None,), dtype=np.uint16),
                "codes_len": f.Tensor(shape=(None,), dtype=np.int32),
                "audio_ref_orig": f.Tensor(shape=(None, 2), dtype=np.int64),
                "num_samples_16k": f.Tensor(shape=(None,), dtype=np.int64),
            }
        )
    if config == "audio":
        return f.FeaturesDict(
            {
                "doc_id": f.Text(),
                "seg_index": f.Scalar(np.int32),
                "version": f.Text(),
                "flac_16k": f.Scalar(np.object_),
                "num_samples": f.Scalar(np.int64),
            }
        )
    return f.FeaturesDict({"row_id": f.Text(), "task": f.Text(), "record": f.Scalar(np.object_)})


class KimiaPrepared(tfds.core.GeneratorBasedBuilder):
    """The prepared record families as TFDS datasets `kimia_prepared/{pt_docs,audio,sft}`."""

    # where TFDS looks for checksums / metadata next to the builder's code (its default lookup
    # needs the `importlib_resources` backport for a top-level package like `data`)
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of data.prepare (training.md §2)."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="pt_docs", description="document chunks (§2.2)"),
        tfds.core.BuilderConfig(name="audio", description="16 kHz FLAC per segment (§2.3)"),
        tfds.core.BuilderConfig(name="sft", description="SFT conversations (§4.1)"),
    ]

    def __init__(self, *, prepared_dir: str | None = None, **kwargs: Any) -> None:
        self.prepared_dir = prepared_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=_features(self.builder_config.name),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # nothing is downloaded: the records are local
        if not self.prepared_dir or not (Path(self.prepared_dir) / "index.json").is_file():
            raise FileNotFoundError(
                f"prepared_dir={self.prepared_dir!r}: no index.json (run python -m data.prepare)"
            )
        from data.pipeline import shard_files

        return {
            "train": self._generate_examples(
                shard_files(self.prepared_dir, self.builder_config.name)
            )
        }

    def _generate_examples(self, files: list[str]):
        keys = set(_features(self.builder_config.name).keys())
        for path in files:
            src = tdata.ArrayRecordSource([path])
            for i, rec in enumerate(src):
                key = f"{Path(path).name}:{i}"
                if self.builder_config.name == "sft":
                    yield (
                        key,
                        {
                            "row_id": rec["row_id"],
                            "task": rec["task"],
                            "record": tdata.encode_record(rec),
                        },
                    )
                else:
                    yield key, {k: rec[k] for k in keys}
