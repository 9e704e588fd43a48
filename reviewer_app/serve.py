"""Run Streamlit on the review app without the endpoints the app does not need.

Streamlit 1.67 registers ``/_stcore/metrics`` unconditionally; before any login it tells anyone
on the network how many sessions are open and how many distinct candidates were viewed. Started
as ``python -m reviewer_app.serve <streamlit run arguments>``, this removes that route and then
hands over to Streamlit's own command line in this process (so signals reach the server
directly). A test requests the route from a running app and expects 404, so a Streamlit upgrade
that moves it is caught.
"""

from __future__ import annotations

import sys


def disable_metrics_route() -> None:
    """Make Streamlit's server build no metrics routes."""
    from streamlit.web.server.starlette import starlette_app

    starlette_app.create_metrics_routes = lambda runtime, base_url: []


def main(argv: list[str]) -> int:
    """``streamlit run ...`` with the metrics route removed."""
    disable_metrics_route()
    from streamlit.web import cli as stcli

    sys.argv = ["streamlit", *argv]
    return stcli.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
