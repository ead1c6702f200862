"""pickalign.eval: the evaluation suite (generate, score, compare, report), and two rooms of
its own: the preference arena (``pickalign.eval.arena``) and the toy world's tools
(``pickalign.eval.toy``)."""
