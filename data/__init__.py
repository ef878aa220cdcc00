"""Data preparation at scale on Apache Beam (issue 14; training.md §1-§2).

    python -m data.prepare --input=<manifest or corpus dir> --output=<dir> --runner=DirectRunner \
        --glm_tokenizer=<glm-4-voice-tokenizer> --text_tokenizer=<folder with tiktoken.model>
    python -m data.extract_codes --input_file=data.jsonl --output_file=data_with_codes.jsonl \
        --tokenizer=<glm-4-voice-tokenizer>

Modules: `manifests` (official SFT jsonl, audio jsonl, LibriSpeech / AISHELL / WenetSpeech readers
-> `SourceRow`s), `segmentation` (energy VAD + the report's merge / split rules), `stages`
(pluggable model stages: enhancement, diarization, transcription), `records` (segments -> the
record families of training.md §2, written with `kimia_jax.training.data.write_records`),
`pipeline` (the Beam graph, shard bookkeeping, dataset card), `prepare` / `extract_codes` (CLIs;
`sft_codes` holds the flag-free work of the latter), `tfds_builder` (a TFDS builder over the
prepared shards). README "Data preparation" has the commands for the DirectRunner, Dataflow and
Flink.
"""
