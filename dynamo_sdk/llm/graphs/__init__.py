"""The LLM graphs, installed with the package; serve one from any directory:

    dynamo serve dynamo_sdk.llm.graphs.agg:Frontend -f agg

(`-f NAME` finds the packaged `dynamo_sdk/llm/configs/NAME.yaml` when no file of that name is
here). The repository's `graphs/` are these modules.
"""
