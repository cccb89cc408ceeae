"""The model-directory contract: what `model_build` writes, `app` serves and `bench` measures.

    datatypes    tensor element types: Open Inference Protocol names, numpy dtypes, ONNX Runtime type strings
    signature    the tensors a graph takes and gives (name, datatype, shape with -1 for dynamic dims)
    combine      how the members' outputs become the ensemble's: the reference every mode and the build check use
    manifest     manifest.json's schema, the directory's layout, checksums, image pre- and post-processing
    modes        the registry of ensembling modes: what each runs, its thread policy, its description
    picture      a picture as an image model takes it: the service's /predict and clients' /v2 tensors alike

It imports neither torch nor onnx nor the service: numpy, pydantic and Pillow only.
"""
