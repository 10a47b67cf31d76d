"""The response side: engine outputs -> OpenAI JSON bodies or server-sent event streams.

fanout.py runs a plan's choices and merges their outputs; choices.py records each choice's
result from them (as they stream, or gathered whole); json_body.py builds one response from
the whole results, event_stream.py streams chunks as outputs come; logprobs.py serves both.
"""
