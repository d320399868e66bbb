"""cgd dashboard: the router and frame. Start it with ``cgd dashboard`` (settings from
.streamlit/config.toml wherever you start it, loopback only unless --allow-remote) or, from the
repository root, ``streamlit run dashboard/app.py``.

Environment: CGD_DATA_ROOT (default ./data) and CGD_RUNS_ROOT (default ./runs) bound what the
dashboard may read and write; CGD_CACHE holds decoded-dataset caches and the demo's reference.
"""
import streamlit as st

import _common as c
import cgd

st.set_page_config(page_title="cgd: backdoor audit", page_icon=str(c.LOGO_ICON), layout="wide")
problem = cgd.serve.check_server_settings()
if problem:
    st.error(problem, icon=":material/gpp_bad:")
    st.stop()
for warning in cgd.serve.server_settings_warnings():
    st.warning(warning, icon=":material/warning:")
st.logo(str(c.LOGO), icon_image=str(c.LOGO_ICON), size="large")

pages = {
    "Audit": [
        st.Page("views/0_home.py", url_path="home", title="Home", default=True, visibility="hidden"),
        st.Page(c.PAGES["dataset"], url_path="dataset", title="Dataset", icon=":material/dataset:"),
        st.Page(c.PAGES["score"], url_path="score", title="Score", icon=":material/speed:"),
        st.Page(c.PAGES["inspect"], url_path="inspect", title="Inspect", icon=":material/query_stats:"),
    ],
    "Repair": [
        st.Page(c.PAGES["separate"], url_path="separate", title="Separate", icon=":material/call_split:"),
        st.Page(c.PAGES["retrain"], url_path="retrain", title="Retrain", icon=":material/model_training:"),
    ],
}
pg = st.navigation(pages, position="hidden")
c.run_from_url()  # before the links are drawn: they carry the run
c.nav_links(pages)
c.sidebar()
pg.run()
