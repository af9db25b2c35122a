// The same refresh and REST call as SalesforceRefresh.java, with the JDK's older HTTP client,
// java.net.HttpsURLConnection (what many Salesforce SDKs and app servers still use), and no proxy or
// trust code: URL.openConnection() uses the default ProxySelector (https.proxyHost/Port,
// http.nonProxyHosts) and the default SSLSocketFactory (javax.net.ssl.trustStore), both set through
// JAVA_TOOL_OPTIONS. Run with the JDK's single-file launcher: java SalesforceRefreshUrlConnection.java
import java.io.InputStream;
import java.io.OutputStream;
import java.net.URI;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.net.ssl.HttpsURLConnection;

public class SalesforceRefreshUrlConnection {
    static String field(String json, String name) {
        Matcher m = Pattern.compile("\"" + name + "\"\\s*:\\s*\"([^\"]*)\"").matcher(json);
        return m.find() ? m.group(1) : null;
    }

    static String enc(String value) {
        return URLEncoder.encode(value, StandardCharsets.UTF_8);
    }

    static String quoted(String value) {
        return value == null ? "null" : "\"" + value + "\"";
    }

    static String body(HttpsURLConnection c) throws Exception {
        InputStream in = c.getResponseCode() < 400 ? c.getInputStream() : c.getErrorStream();
        return in == null ? "" : new String(in.readAllBytes(), StandardCharsets.UTF_8);
    }

    static HttpsURLConnection open(String url) throws Exception {
        HttpsURLConnection c = (HttpsURLConnection) URI.create(url).toURL().openConnection();
        c.setConnectTimeout(10000);
        c.setReadTimeout(15000);
        return c;
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> env = System.getenv();
        byte[] form = ("grant_type=refresh_token&refresh_token=" + enc(env.get("SF_REFRESH_TOKEN"))
                + "&client_id=" + enc(env.get("SF_CLIENT_ID")) + "&client_secret=" + enc(env.get("SF_CLIENT_SECRET")))
                .getBytes(StandardCharsets.UTF_8);
        HttpsURLConnection t = open(env.get("SF_TOKEN_URL"));
        t.setRequestMethod("POST");
        t.setDoOutput(true);
        t.setFixedLengthStreamingMode(form.length);  // sent with a Content-Length
        t.setRequestProperty("Content-Type", "application/x-www-form-urlencoded");
        try (OutputStream out = t.getOutputStream()) {
            out.write(form);
        }
        int tokenStatus = t.getResponseCode();
        String tokenBody = body(t);
        String restStatus = "null";
        String versions = "null";
        if (tokenStatus == 200) {
            HttpsURLConnection r = open(field(tokenBody, "instance_url") + "/services/data/");
            r.setRequestProperty("Authorization", "Bearer " + field(tokenBody, "access_token"));
            restStatus = Integer.toString(r.getResponseCode());
            versions = Integer.toString(body(r).split("\"version\"", -1).length - 1);
        }
        String rotated = tokenStatus == 200 ? field(tokenBody, "refresh_token") : null;
        System.out.println("{\"token_status\":" + tokenStatus + ",\"refresh_token\":" + quoted(rotated)
                + ",\"rest_status\":" + restStatus + ",\"api_versions\":" + versions + "}");
    }
}
