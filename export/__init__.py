"""Converters and runtime adapters, one module per format (onnx, litert, coreml, executorch).

Reached through the format registry (`hetero.formats`); each module imports its converter packages inside
the functions that use them, so importing one stays light.  The export stage is `hetero.exporter`.
"""
