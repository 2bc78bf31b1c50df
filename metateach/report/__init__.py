"""What a run draws and measures about itself: figures (:mod:`~.plots`) and what a
teacher does to the data (:mod:`~.diagnostics`). The trainer calls them; they
call nothing above them."""
