"""Shared by every test directory.

Having a conftest here puts tests/ on sys.path (pytest's default import
mode), so helpers used across directories, such as :mod:`qemu_support`
(a real QEMU guest), live once, beside this file.
"""
