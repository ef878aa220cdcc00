"""Text floor: the Kimi-Audio tiktoken tokenizer and the conversation format (messages -> the two
token streams of spec/llm.md §2)."""
