"""medunet networks (work in progress)."""


def list_networks() -> list[str]:
    return []
