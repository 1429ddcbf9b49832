"""The built-in backends' own suite modules: each backend names its modules in
``Backend.suite_modules``, and the plugin adds them to a run that selects that backend. They test
what only that backend has (FlashInfer's cuDNN ragged path, TensorRT-LLM's FMHAv2/XQA split) and
may plant bugs in their own backend's methods; they are not backends (the registry skips packages).
"""
