"""Build script. Metadata lives in pyproject.toml; this file maps the package layout.

``kernels/`` (Triton) ships as the subpackage ``fastmask.kernels``, never as a top-level
``kernels`` module (a PyPI package already has that name).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

packages = find_packages(include=["fastmask", "fastmask.*"])
package_dir = {}
if os.path.isdir(os.path.join(HERE, "kernels")):
    packages.append("fastmask.kernels")
    package_dir["fastmask.kernels"] = "kernels"

setup(packages=packages, package_dir=package_dir)
