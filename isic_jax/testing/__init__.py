"""Test-only code shipped with the package: release layouts for fixtures (`layouts`), kill
hooks injected into the trainer as `training.events` observers (`hooks`, `cli`), and runs with
injected data and devices (`runs`).

Nothing in the library imports this package: it sits above every other unit.
"""
