<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="iqt-pipe with NiReports">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{{ title }}</title>
{# Self-contained on purpose: no scripts or style sheets from the network, so the report
   opens offline, on a cluster's login node and in an archive years later. #}
<style>
body { font-family: "Helvetica Neue", Helvetica, Arial, sans-serif; margin: 0; color: #222; background: #fff; line-height: 1.45; }
nav { position: sticky; top: 0; z-index: 10; background: #f4f5f7; border-bottom: 1px solid #ccd; padding: 0.4em 1.2em; }
nav ul { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 0.3em 1.4em; }
nav li ul { display: inline-flex; gap: 0.2em 0.8em; margin-left: 0.4em; font-size: 0.85em; }
nav a { color: #1d4f91; text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { padding: 0.6em 1.6em 2em; max-width: 1500px; }
h1 { font-size: 1.6em; margin: 0.6em 0 0.2em; }
h2.iqt-section { font-size: 1.35em; border-bottom: 2px solid #1d4f91; padding-bottom: 0.15em; margin-top: 1.4em; }
h3.iqt-group { font-size: 1.15em; margin: 1.2em 0 0.2em; color: #1d4f91; }
h3.iqt-title, h4 { font-size: 1.02em; margin: 1em 0 0.3em; }
.bids-entity { font-family: monospace; }
.reportlet img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
.elem-caption, .elem-desc, .iqt-note { color: #555; font-size: 0.9em; }
.iqt-table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 0.9em; }
.iqt-table th, .iqt-table td { border: 1px solid #d5d8dd; padding: 0.25em 0.6em; text-align: left; vertical-align: middle; }
.iqt-table th { background: #f0f2f5; }
.iqt-table td.iqt-num { text-align: right; font-variant-numeric: tabular-nums; }
.iqt-table td.iqt-flag { text-align: right; background: #f8c9c9; font-weight: bold; }
.iqt-table tr.iqt-outlier td { background: #fde8e8; }
.iqt-table tr.iqt-outlier td.iqt-flag { background: #f3a5a5; }
.iqt-group td:first-child { white-space: nowrap; }
.iqt-z { color: #666; font-size: 0.85em; font-weight: normal; }
.iqt-thumb { width: 96px; height: auto; display: block; background: #000; }
.iqt-alert { background: #fde8e8; border-left: 4px solid #c0392b; padding: 0.4em 0.8em; }
.iqt-ok { background: #e8f6ea; border-left: 4px solid #2e8b57; padding: 0.4em 0.8em; }
.iqt-bad { color: #b0281a; }
.iqt-crash { margin: 0.6em 0; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.82em; white-space: pre-wrap; }
code { font-size: 0.92em; }
details summary { cursor: pointer; color: #1d4f91; }
.iqt-methods p { max-width: 60em; }
.iqt-references li { margin-bottom: 0.3em; font-size: 0.92em; }
footer { margin-top: 2.5em; color: #777; font-size: 0.82em; border-top: 1px solid #ddd; padding-top: 0.5em; }
</style>
</head>
<body>
<nav>
<ul>
{% for sub_report in sections %}
<li><a href="#{{ sub_report.name | lower | replace(' ', '-') }}">{{ sub_report.name }}</a>
{% if sub_report.isnested %}
<ul>
{% for run_report in sub_report.reportlets %}
{% if run_report.title %}<li><a href="#{{ run_report.name }}">{{ run_report.title | striptags | replace('Reports for: ', '') }}</a></li>{% endif %}
{% endfor %}
</ul>
{% endif %}
</li>
{% endfor %}
</ul>
</nav>
<main>
<h1>{{ title }}</h1>
{% for sub_report in sections %}
{% if sub_report.reportlets %}
<section id="{{ sub_report.name | lower | replace(' ', '-') }}">
<h2 class="iqt-section">{{ sub_report.name }}</h2>
{% for run_report in sub_report.reportlets %}
<div id="{{ run_report.name }}" class="iqt-reportlet">
{% if run_report.title %}<h3 class="iqt-group">{{ run_report.title }}</h3>{% endif %}
{% if run_report.subtitle %}<h3 class="iqt-title">{{ run_report.subtitle }}</h3>{% endif %}
{% if run_report.description %}<p class="elem-desc">{{ run_report.description }}</p>{% endif %}
{% for elem in run_report.components %}
{% if elem[0] %}
{% if elem[1] %}<p class="elem-caption">{{ elem[1] }}</p>{% endif %}
{{ elem[0] }}
{% endif %}
{% endfor %}
</div>
{% endfor %}
</section>
{% endif %}
{% endfor %}
{% for ff in footer %}
{{ ff }}
{% endfor %}
<footer>Assembled by NiReports from the reportlets in this participant's <code>figures/</code> folder; every number and
image is read back from the derivatives in this output folder.</footer>
</main>
</body>
</html>
