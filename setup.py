"""The optional C++ merge loop of the BPE trainer; lmtrain falls back to Python when it cannot be built."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lmtrain.tokenizer._bpe_native",
            ["src/lmtrain/tokenizer/_bpe_native.cpp"],
            language="c++",
            extra_compile_args=["-O2", "-std=c++17"],
            optional=True,
        )
    ]
)
