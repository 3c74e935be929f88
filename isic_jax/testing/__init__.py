"""Test-only code shipped with the package: release layouts for fixtures (`layouts`), the kill
hooks the trainer calls (`hooks`), and runs with injected data and devices (`runs`).

Nothing in the library imports this package except `hooks`, whose calls are no-ops unless the
test environment variable is set.
"""
