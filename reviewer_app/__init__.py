"""The Streamlit reviewer app (login, review queue, decisions)."""
