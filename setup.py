"""Packaging: lmtrain from src/, the top-level conf/ as lmtrain.conf, and the optional C++ merge loop of the BPE
trainer (lmtrain falls back to Python when it cannot be built)."""

from setuptools import Extension, find_namespace_packages, setup

CONF_PACKAGES = ["lmtrain.conf", *(f"lmtrain.conf.{group}" for group in find_namespace_packages("conf"))]

setup(
    packages=[*find_namespace_packages("src"), *CONF_PACKAGES],
    package_dir={"": "src", "lmtrain.conf": "conf"},
    package_data={package: ["*.yaml"] for package in CONF_PACKAGES},
    ext_modules=[
        Extension(
            "lmtrain.tokenizer._bpe_native",
            ["src/lmtrain/tokenizer/_bpe_native.cpp"],
            language="c++",
            extra_compile_args=["-O2", "-std=c++17"],
            optional=True,
        )
    ],
)
