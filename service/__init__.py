"""The BentoML HTTP service (`service.service:Tipsen`) and its web page (`service/static/`)."""
