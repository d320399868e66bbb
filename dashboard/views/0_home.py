"""The site root: sends the visitor to the Dataset page (so /dataset is a real address too)."""

import _common as c

c.switch_page(c.PAGES["dataset"])
