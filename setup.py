"""seminar-tf: SEMINAR / EM3 lifelong multi-modal sequence recommendation in TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="seminar-tf",
    version="0.1.0",
    description="Lifelong multi-modal sequence recommendation (SEMINAR, EM3): Beam -> Keras -> TF Serving",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["seminar_tf", "seminar_tf.*", "beam_pipelines", "beam_pipelines.*", "serving",
                                    "serving.*"]),
    include_package_data=True,
    package_data={"serving": ["*.config", "*.txt"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorflow-recommenders>=0.7.7,<0.8",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-serving-api>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",  # the TensorBoard callback; TF 2.21 no longer pulls it in
        "apache-beam[tfrecord]>=2.77,<2.78",
        "google-crc32c>=1.5",  # Beam's fast TFRecord CRC (the [tfrecord] extra does not pull it here)
        "numpy>=1.26,<3",
        "pyarrow>=15",
        "pyyaml>=6",
    ],
    extras_require={
        # cryptography: throwaway TLS certificates; ruff: `make lint`
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3", "cryptography>=41", "ruff==0.17.6"],
        "pq": ["faiss-cpu>=1.9,<2"],
        "report": ["matplotlib>=3.8,<4"],
    },
    entry_points={"console_scripts": ["seminar-tf=seminar_tf.cli:main"]},
)
