"""The response side: engine outputs -> OpenAI JSON bodies or server-sent event streams.

fanout.py runs a plan's choices and merges their outputs; json_body.py gathers them into one
response, event_stream.py streams them as chunks; both build on choices.py and logprobs.py.
"""
