"""The request side: an API request, validated by protocol.py, -> what the engine runs.

plan/ is the entry (a GenerationPlan: prompt ids and one SamplingParams per choice); it uses
chat_prompt.py, tools.py and constraints.py; embeddings.py does the same for /v1/embeddings.
"""
